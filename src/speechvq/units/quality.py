"""Unit quality against frame-level phone labels (HuBERT paper, Hsu et al. 2021, section IV-F).

With the joint distribution ``p(y, z)`` of phone label ``y`` and unit ``z`` over all aligned
frames:

- phone purity ``E_z[max_y p(y | z)]``: how pure a unit is in phones (higher is better);
- cluster purity ``E_y[max_z p(z | y)]``: how concentrated a phone is in one unit;
- PNMI ``I(y; z) / H(y)``: the share of phone uncertainty a unit removes (0 = independent, 1 =
  the unit determines the phone).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechvq.errors import UserInputError
from speechvq.files import read_text
from speechvq.units.io import Units

UNALIGNED = -1
"""Frame label of frames no alignment segment covers; such frames are not counted."""


@dataclass
class UnitQuality:
    """The three unit-quality measures and what they were computed over."""

    phone_purity: float
    cluster_purity: float
    pnmi: float
    num_frames: int
    """Frames counted (aligned ones)."""
    num_phones: int
    """Distinct phone labels seen."""
    num_units: int
    """Distinct units seen."""

    def as_dict(self) -> dict[str, float]:
        return {
            "phone_purity": self.phone_purity,
            "cluster_purity": self.cluster_purity,
            "pnmi": self.pnmi,
            "num_frames": self.num_frames,
            "num_phones": self.num_phones,
            "num_units": self.num_units,
        }


class JointCounts:
    """Accumulates the phone x unit frame counts utterance by utterance (labels map to rows and
    columns on first sight), so a corpus streams through it."""

    def __init__(self) -> None:
        self.phones: dict[str, int] = {}
        self.units: dict[str, int] = {}
        self._pairs: dict[tuple[int, int], int] = {}

    def update(self, phones: Iterable[str | None], units: Iterable[str | int]) -> None:
        """Count aligned frame pairs; a ``None`` phone (unaligned frame) is skipped."""
        for y, z in zip(phones, units, strict=True):
            if y is None:
                continue
            row = self.phones.setdefault(y, len(self.phones))
            col = self.units.setdefault(str(z), len(self.units))
            self._pairs[(row, col)] = self._pairs.get((row, col), 0) + 1

    def matrix(self) -> np.ndarray:
        """``[num_phones, num_units]`` int64 counts."""
        out = np.zeros((len(self.phones), len(self.units)), dtype=np.int64)
        for (row, col), n in self._pairs.items():
            out[row, col] = n
        return out


def unit_quality(counts: np.ndarray) -> UnitQuality:
    """Phone purity, cluster purity and PNMI of a ``[num_phones, num_units]`` count matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"`counts` must be 2-D [phones, units], but has shape {counts.shape} instead.")
    total = counts.sum()
    if total <= 0:
        raise ValueError("`counts` must count at least one frame, but is all zero instead.")
    p_yz = counts / total
    p_y = p_yz.sum(axis=1)
    p_z = p_yz.sum(axis=0)
    # E_z[max_y p(y|z)] = sum_z p(z) max_y p(y,z)/p(z) = sum_z max_y p(y,z); likewise for clusters
    phone_purity = float(p_yz.max(axis=0).sum())
    cluster_purity = float(p_yz.max(axis=1).sum())
    nz = p_yz > 0
    outer = np.outer(p_y, p_z)
    mutual_info = float((p_yz[nz] * np.log(p_yz[nz] / outer[nz])).sum())
    py = p_y[p_y > 0]
    h_y = float(-(py * np.log(py)).sum())
    pnmi = mutual_info / h_y if h_y > 0 else 0.0
    return UnitQuality(
        phone_purity=phone_purity,
        cluster_purity=cluster_purity,
        pnmi=pnmi,
        num_frames=int(total),
        num_phones=int((p_y > 0).sum()),
        num_units=int((p_z > 0).sum()),
    )


def read_alignment(path: str | os.PathLike[str]) -> list[tuple[float, float, str]]:
    """Read an alignment file: ``start_s end_s label`` per line (the synthetic corpus's ``.phones``).

    Raises:
        UserInputError: naming ``file:line`` for a line that does not parse.
    """
    path = Path(path)
    text = read_text(path, "alignment file", max_bytes=None)
    segments = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            start, end = float(fields[0]), float(fields[1])
            label = fields[2]
        except (ValueError, IndexError):
            raise UserInputError(
                f"{path}:{lineno}: expected 'start_s end_s label', but found {line!r}"
            ) from None
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
            raise UserInputError(f"{path}:{lineno}: times must be finite and >= 0, but are {start} and {end}")
        if end < start:
            raise UserInputError(f"{path}:{lineno}: end {end} is before start {start}")
        segments.append((start, end, label))
    return segments


def frame_labels(
    segments: list[tuple[float, float, str]],
    num_frames: int,
    frame_stride_s: float,
    frame_centre_s: float | None = None,
) -> list[str | None]:
    """The label of each frame: the segment holding the frame's centre ``c + i * stride``.

    Args:
        segments: ``(start_s, end_s, label)``, sorted by start.
        num_frames: frames of the utterance.
        frame_stride_s: seconds between frames (wav2vec 2.0: 0.02).
        frame_centre_s: ``c``, the centre of frame 0's receptive field (wav2vec 2.0's CNN: 400
            samples, 0.0125 s); None: the middle of the first stride, ``stride / 2``.

    Returns:
        ``num_frames`` labels; None for frames no segment covers.
    """
    if frame_stride_s <= 0:
        raise ValueError(f"`frame_stride_s` must be positive, but is {frame_stride_s} instead.")
    starts = np.asarray([s for s, _, _ in segments], dtype=np.float64)
    ends = np.asarray([e for _, e, _ in segments], dtype=np.float64)
    first = 0.5 * frame_stride_s if frame_centre_s is None else frame_centre_s
    centres = first + np.arange(num_frames) * frame_stride_s
    idx = np.searchsorted(starts, centres, side="right") - 1  # last segment starting before the centre
    out: list[str | None] = []
    for t, k in zip(centres, idx):
        out.append(segments[k][2] if k >= 0 and t < ends[k] else None)
    return out


def find_alignment(root: Path, utterance: str, suffix: str, index: dict[str, Path] | None) -> Path | None:
    """``root/<utterance with suffix>``, else a file of that name anywhere below ``root`` (via
    ``index``, a name -> path map of every alignment file, built by the caller on first need)."""
    path = (root / utterance).with_suffix(suffix)
    if path.is_file():
        return path
    if index is None:
        return None
    return index.get(Path(utterance).with_suffix(suffix).name)


def evaluate_units(
    units: Units,
    alignments: str | os.PathLike[str],
    *,
    suffix: str = ".phones",
    frame_stride_s: float | None = None,
    frame_centre_s: float | None = None,
) -> UnitQuality:
    """:func:`unit_quality` of a units directory against per-utterance alignment files.

    Args:
        units: read with :func:`~speechvq.units.io.read_units`.
        alignments: directory of the alignment files (see :func:`find_alignment`).
        suffix: alignment file suffix.
        frame_stride_s: seconds per frame; default: the units' ``meta.json``.
        frame_centre_s: centre of frame 0 (see :func:`frame_labels`); default: the units'
            ``meta.json``, else half a stride.

    Raises:
        UserInputError: no frame stride, a missing directory or a missing alignment file.
    """
    stride = frame_stride_s or units.meta.get("frame_stride_s")
    if not stride:
        raise UserInputError("the units have no frame_stride_s in meta.json; pass the frame stride")
    centre = frame_centre_s if frame_centre_s is not None else units.meta.get("frame_centre_s")
    root = Path(alignments)
    if not root.is_dir():
        raise UserInputError(f"{root}: alignment directory does not exist")
    index: dict[str, Path] | None = None
    counts = JointCounts()
    for i, utt in enumerate(units.utterances):
        path = find_alignment(root, utt, suffix, index)
        if path is None and index is None:
            index = {p.name: p for p in root.rglob(f"*{suffix}")}
            path = find_alignment(root, utt, suffix, index)
        if path is None:
            raise UserInputError(f"{root}: no alignment file for utterance {i + 1} ({utt})")
        frames = units.frames(i)
        labels = frame_labels(read_alignment(path), len(frames), float(stride), centre)
        counts.update(labels, frames)
    return unit_quality(counts.matrix())
