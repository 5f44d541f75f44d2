"""The on-disk format of discrete units, documented once (see also ``docs/units.md``).

A units directory holds, for the N items of a manifest, in manifest order:

- ``units.txt``: one line per utterance, its unit tokens separated by single spaces (the fairseq /
  HuBERT ``.km`` convention). Tokens are integers (k-means ids, joint code ids) or vq-wav2vec's
  ``g0-g1`` group codes. An utterance without frames has an empty line.
- ``durations.txt`` (only with run-length deduplication): one line per utterance, the number of
  frames each token of ``units.txt`` lasts; expanding every token by its duration gives back the
  per-frame sequence.
- ``timestamps.txt``: one line per utterance, the start time in seconds of each token of
  ``units.txt`` (frame ``i`` starts at ``i * frame_stride_s``; a deduplicated token starts at its
  run's first frame). The token ends where the next one starts, or ``durations * frame_stride_s``
  after its start.
- ``utts.txt``: one line per utterance, its path relative to the manifest root (how alignments
  and other per-utterance files are found again).
- ``meta.json``: ``{"format": "speechvq-units", "kind", "num_utterances", "frame_stride_s",
  "dedup", "vocab_size", ...}`` plus whatever the exporter adds (model, layer, k-means path).
  ``frame_centre_s``, when present, is the centre of frame 0's receptive field in the input (frame
  ``i``'s is ``frame_centre_s + i * frame_stride_s``); unit-quality reads each frame's label there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speechvq.errors import UserInputError
from speechvq.files import check_output_dir, decode_utf8, read_bytes, read_json, write_atomic, writing

UNITS_NAME = "units.txt"
DURATIONS_NAME = "durations.txt"
TIMESTAMPS_NAME = "timestamps.txt"
UTTS_NAME = "utts.txt"
META_NAME = "meta.json"
FORMAT = "speechvq-units"

Token = str | int


def run_length_encode(tokens: Sequence[Token]) -> tuple[list[Token], list[int]]:
    """Collapse runs of equal consecutive tokens: ``a a b a`` -> (``[a, b, a]``, ``[2, 1, 1]``)."""
    values: list[Token] = []
    durations: list[int] = []
    for tok in tokens:
        if values and values[-1] == tok:
            durations[-1] += 1
        else:
            values.append(tok)
            durations.append(1)
    return values, durations


def run_length_decode(values: Sequence[Token], durations: Sequence[int]) -> list[Token]:
    """Inverse of :func:`run_length_encode`."""
    if len(values) != len(durations):
        raise ValueError(
            f"`durations` must have one entry per value ({len(values)}), but has {len(durations)} instead."
        )
    out: list[Token] = []
    for tok, n in zip(values, durations):
        out.extend([tok] * int(n))
    return out


class UnitWriter:
    """Writes a units directory line by line, so a corpus of any size streams through it.

    Use as a context manager; ``meta.json`` is written on a clean exit (a directory without it is
    an unfinished export).

    Args:
        directory: output directory (created).
        frame_stride_s: seconds between consecutive frames.
        dedup: collapse runs of equal units and write ``durations.txt``.
        frame_centre_s: centre of frame 0's receptive field in seconds (recorded in ``meta.json``;
            see the module docstring); None records none.
        meta: extra entries for ``meta.json`` (``kind``, ``vocab_size``, the model, ...).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        frame_stride_s: float,
        dedup: bool = False,
        frame_centre_s: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if frame_stride_s <= 0:
            raise ValueError(f"`frame_stride_s` must be positive, but is {frame_stride_s} instead.")
        if frame_centre_s is not None and frame_centre_s < 0:
            raise ValueError(f"`frame_centre_s` must be >= 0, but is {frame_centre_s} instead.")
        self.directory = check_output_dir(directory, "the units directory")
        with writing(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / META_NAME).unlink(missing_ok=True)
        self.frame_stride_s = float(frame_stride_s)
        self.dedup = dedup
        self.meta = dict(meta or {})
        if frame_centre_s is not None:
            self.meta["frame_centre_s"] = float(frame_centre_s)
        self.num_utterances = 0
        self.num_frames = 0
        self.num_tokens = 0
        with writing(self.directory):
            self._units = open(self.directory / UNITS_NAME, "w", encoding="utf-8")  # noqa: SIM115
            self._times = open(self.directory / TIMESTAMPS_NAME, "w", encoding="utf-8")  # noqa: SIM115
            self._utts = open(self.directory / UTTS_NAME, "w", encoding="utf-8")  # noqa: SIM115
            self._durs = (
                open(self.directory / DURATIONS_NAME, "w", encoding="utf-8") if dedup else None  # noqa: SIM115
            )
            if not dedup:
                (self.directory / DURATIONS_NAME).unlink(missing_ok=True)

    def write(self, utterance: str, tokens: Sequence[Token]) -> None:
        """Append one utterance's per-frame tokens (deduplicated here if ``dedup``).

        Raises:
            UserInputError: the write failed (``no space left on device: <units.txt>``).
        """
        if any(" " in str(t) or "\n" in str(t) or str(t) == "" for t in tokens):
            raise ValueError("`tokens` must be non-empty strings without whitespace.")
        with writing(self.directory / UNITS_NAME):
            self._write(utterance, tokens)

    def _write(self, utterance: str, tokens: Sequence[Token]) -> None:
        self.num_frames += len(tokens)
        if self.dedup:
            values, durations = run_length_encode(tokens)
            starts = np.concatenate([[0], np.cumsum(durations)[:-1]]) if durations else np.zeros(0)
            assert self._durs is not None
            self._durs.write(" ".join(map(str, durations)) + "\n")
        else:
            values, starts = list(tokens), np.arange(len(tokens))
        self.num_tokens += len(values)
        self._units.write(" ".join(map(str, values)) + "\n")
        self._times.write(" ".join(_format_time(s * self.frame_stride_s) for s in starts) + "\n")
        self._utts.write(utterance + "\n")
        self.num_utterances += 1

    def close(self, *, complete: bool = True) -> None:
        """Close the files; write ``meta.json`` if ``complete``."""
        with writing(self.directory / UNITS_NAME):
            for f in (self._units, self._times, self._utts, self._durs):
                if f is not None:
                    f.close()
        if complete:
            meta = {
                "format": FORMAT,
                "num_utterances": self.num_utterances,
                "num_frames": self.num_frames,
                "num_tokens": self.num_tokens,
                "frame_stride_s": self.frame_stride_s,
                "dedup": self.dedup,
                **self.meta,
            }
            write_atomic(self.directory / META_NAME, json.dumps(meta, indent=2) + "\n")

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(complete=exc_type is None)


def _format_time(seconds: float) -> str:
    return f"{seconds:.4f}".rstrip("0").rstrip(".") or "0"


@dataclass
class Units:
    """A units directory read back."""

    tokens: list[list[str]]
    """Per utterance, its tokens as written (deduplicated if ``meta["dedup"]``)."""
    durations: list[list[int]] | None
    """Per utterance, frames per token (only for deduplicated units)."""
    utterances: list[str]
    """Per utterance, its manifest-relative path."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The contents of ``meta.json``."""

    def __len__(self) -> int:
        return len(self.tokens)

    def frames(self, index: int) -> list[str]:
        """The per-frame token sequence of utterance ``index`` (durations expanded)."""
        if self.durations is None:
            return list(self.tokens[index])
        return [str(t) for t in run_length_decode(self.tokens[index], self.durations[index])]

    def frame_ids(self, index: int) -> np.ndarray:
        """``[T]`` int64 per-frame ids of utterance ``index`` (integer units only)."""
        return np.asarray([int(t) for t in self.frames(index)], dtype=np.int64)


MAX_UTTERANCE_FRAMES = 10**7
"""Most frames one utterance of a units directory may expand to (55 h at 20 ms frames): a
``durations.txt`` claiming more is refused rather than expanded."""


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise UserInputError(f"{path}: file does not exist")
    return decode_utf8(read_bytes(path, "units file"), path, "units file").split("\n")[:-1]


def _check_ids(path: Path, tokens: list[list[str]], vocab_size: int) -> None:
    for lineno, toks in enumerate(tokens, start=1):
        for tok in toks:
            try:
                value = int(tok)
            except ValueError:
                raise UserInputError(
                    f"{path}:{lineno}: unit {tok!r} is not an integer id (meta.json vocab_size is {vocab_size})"
                ) from None
            if not 0 <= value < vocab_size:
                raise UserInputError(
                    f"{path}:{lineno}: unit id {value} is out of range [0, {vocab_size}) (meta.json vocab_size)"
                )


def read_units(directory: str | os.PathLike[str]) -> Units:
    """Read a units directory written by :class:`UnitWriter` (or by hand: ``units.txt`` alone).

    Raises:
        UserInputError: a missing ``units.txt``, files of different line counts, or a duration
            line that does not match its units line, naming the file and line.
    """
    root = Path(directory)
    if root.is_file():  # a bare units file
        root, units_path = root.parent, root
        meta: dict[str, Any] = {}
    else:
        units_path = root / UNITS_NAME
        meta = {}
        if (root / META_NAME).exists():
            meta = read_json(root / META_NAME, "units metadata")
    lines = _read_lines(units_path)
    tokens = [line.split() for line in lines]
    vocab_size = meta.get("vocab_size")
    if isinstance(vocab_size, int):  # integer units: every id in [0, vocab_size)
        _check_ids(units_path, tokens, vocab_size)
    utts_path = root / UTTS_NAME
    if meta and utts_path.is_file():
        utterances = _read_lines(utts_path)
        if len(utterances) != len(tokens):
            raise UserInputError(
                f"{utts_path}: has {len(utterances)} lines, but {units_path} has {len(tokens)}"
            )
    else:
        utterances = [str(i) for i in range(len(tokens))]
    durations = None
    if meta.get("dedup"):
        dur_path = root / DURATIONS_NAME
        dur_lines = _read_lines(dur_path)
        if len(dur_lines) != len(tokens):
            raise UserInputError(
                f"{dur_path}: has {len(dur_lines)} lines, but {units_path} has {len(tokens)}"
            )
        durations = []
        for lineno, (line, toks) in enumerate(zip(dur_lines, tokens), start=1):
            try:
                durs = [int(d) for d in line.split()]
            except ValueError:
                raise UserInputError(f"{dur_path}:{lineno}: durations must be integers") from None
            if len(durs) != len(toks) or any(d < 1 for d in durs):
                raise UserInputError(
                    f"{dur_path}:{lineno}: expected {len(toks)} positive durations, but found {line[:200]!r}"
                )
            if sum(durs) > MAX_UTTERANCE_FRAMES:
                raise UserInputError(
                    f"{dur_path}:{lineno}: durations must add up to at most {MAX_UTTERANCE_FRAMES} frames, "
                    f"but add up to {sum(durs)} instead."
                )
            durations.append(durs)
    return Units(tokens=tokens, durations=durations, utterances=utterances, meta=meta)
