"""k-means over model features: sharded feature dumps, MiniBatchKMeans fitting, pickle-free models.

Feature shards, documented once: a dump directory holds ``shard_00000.npy`` (``[N, D]`` float32
rows, the frames of whole utterances one after another) and ``shard_00000.len`` (the frame count
of each of those utterances, one per line), ``shard_00001.*``, ... (fairseq's HuBERT ``.npy`` +
``.len`` dump, split into shards).

A fitted model is a directory with ``centroids.npy`` (``[K, D]`` float32) and ``kmeans.json``
(``{"format": "speechvq-kmeans", "k", "dim", ...}``); loading it never unpickles.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.config import MAX_SIZE
from speechvq.data.checks import SkipCounts
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir, read_json, require_file, write_atomic, writing

logger = logging.getLogger(__name__)

CENTROIDS_NAME = "centroids.npy"
META_NAME = "kmeans.json"
FORMAT = "speechvq-kmeans"


class FeatureShardWriter:
    """Buffers utterance features and writes them as ``.npy`` + ``.len`` shards.

    At most ``max(shard_size, longest utterance)`` rows are held at once: an utterance that would
    overflow the buffer flushes it first (utterances are never split across shards).

    Args:
        directory: where the shards go (created).
        shard_size: rows per shard (a shard may be smaller, or larger for one long utterance).
    """

    def __init__(self, directory: str | os.PathLike[str], shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"`shard_size` must be >= 1, but is {shard_size} instead.")
        self.directory = check_output_dir(directory, "the features directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.skipped = SkipCounts()
        """Utterances left out of the dump (filled by :func:`~speechvq.units.export.dump_features`)."""
        self.num_shards = 0
        self.num_rows = 0
        self.max_rows_held = 0
        self._buffer: list[np.ndarray] = []
        self._held = 0

    def add(self, features: np.ndarray | Tensor) -> None:
        """Append one utterance's ``[T, D]`` features."""
        rows = features.detach().cpu().float().numpy() if isinstance(features, Tensor) else features
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"`features` must be 2-D [T, D], but has shape {rows.shape} instead.")
        if self._held and self._held + len(rows) > self.shard_size:
            self.flush()
        self._buffer.append(rows)
        self._held += len(rows)
        self.max_rows_held = max(self.max_rows_held, self._held)
        if self._held >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered utterances as the next shard."""
        if not self._buffer:
            return
        stem = self.directory / f"shard_{self.num_shards:05d}"
        with writing(f"{stem}.npy"):
            np.save(f"{stem}.npy", np.concatenate(self._buffer, axis=0))
            Path(f"{stem}.len").write_text("".join(f"{len(b)}\n" for b in self._buffer))
        self.num_shards += 1
        self.num_rows += self._held
        self._buffer, self._held = [], 0

    def close(self) -> None:
        self.flush()


def shard_paths(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``.npy`` shards of a dump directory, in order."""
    paths = sorted(Path(directory).glob("shard_*.npy"))
    if not paths:
        raise UserInputError(f"{directory}: no feature shards (shard_*.npy)")
    return paths


def sample_rows(directory: str | os.PathLike[str], percent: float, seed: int = 0) -> np.ndarray:
    """A random ``percent`` % of the dumped rows (each row kept independently), ``[N', D]``.

    Shards are memory-mapped, so only the sample is ever held in memory.
    """
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"`percent` must be in (0, 100], but is {percent} instead.")
    rng = np.random.default_rng(seed)
    parts = []
    for path in shard_paths(directory):
        rows = np.load(path, mmap_mode="r")
        keep = (
            np.arange(len(rows))
            if percent >= 100.0
            else np.flatnonzero(rng.random(len(rows)) < percent / 100)
        )
        parts.append(np.asarray(rows[keep], dtype=np.float32))
    return np.concatenate(parts, axis=0)


@dataclass
class KMeansModel:
    """Fitted centroids and their metadata; assigns features to the nearest centroid."""

    centroids: np.ndarray
    """``[K, D]`` float32."""
    meta: dict[str, Any]
    """Fit settings and provenance (``k``, ``dim``, ``layer``, ``model``, ``inertia``, ...)."""

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def predict(self, features: Tensor | np.ndarray, chunk: int = 8192) -> Tensor:
        """Nearest-centroid ids (squared Euclidean distance) of ``[..., D]`` features -> ``[...]`` int64."""
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
        if x.size(-1) != self.centroids.shape[1]:
            raise ValueError(
                f"`features` must have dim {self.centroids.shape[1]} (the centroids'), "
                f"but has {x.size(-1)} instead."
            )
        c = torch.from_numpy(self.centroids).to(x.device)
        c_sq = (c * c).sum(-1)
        flat = x.reshape(-1, x.size(-1)).float()  # (..., D) -> (N, D)
        out = torch.empty(flat.size(0), dtype=torch.long, device=x.device)
        for start in range(0, flat.size(0), chunk):
            rows = flat[start : start + chunk]
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin
            out[start : start + chunk] = (c_sq[None, :] - 2.0 * rows @ c.T).argmin(dim=-1)
        return out.reshape(x.shape[:-1])

    def save(self, directory: str | os.PathLike[str]) -> Path:
        target = check_output_dir(directory, "the k-means model directory")
        meta = {"format": FORMAT, "k": self.k, "dim": int(self.centroids.shape[1]), **self.meta}
        with writing(target / CENTROIDS_NAME):
            target.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, self.centroids.astype(np.float32))
        write_atomic(target / CENTROIDS_NAME, buffer.getvalue())
        write_atomic(target / META_NAME, json.dumps(meta, indent=2) + "\n")
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KMeansModel:
        root = Path(directory)
        meta_path, cent_path = root / META_NAME, root / CENTROIDS_NAME
        if not meta_path.exists() or not cent_path.exists():
            raise UserInputError(f"{root}: not a k-means model (needs {META_NAME} and {CENTROIDS_NAME})")
        meta = read_json(meta_path, "k-means metadata")
        if meta.get("format") != FORMAT:
            raise UserInputError(f'{meta_path}: not a k-means model (missing "format": "{FORMAT}")')
        for key in ("k", "dim"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserInputError(f"{meta_path}: `{key}` must be an integer, but is {value!r} instead")
            if not 1 <= value <= MAX_SIZE:
                raise UserInputError(
                    f"{meta_path}: `{key}` must be in [1, {MAX_SIZE}], but is {value} instead"
                )
        require_file(cent_path, "centroids file")
        try:
            # memory-mapped first: the header's shape is checked before anything is read into memory
            mapped = np.load(cent_path, allow_pickle=False, mmap_mode="r")
            if tuple(mapped.shape) != (meta["k"], meta["dim"]):
                raise UserInputError(
                    f"{cent_path}: shape {tuple(mapped.shape)} does not match k={meta['k']}, dim={meta['dim']}"
                )
            centroids = np.array(mapped, dtype=np.float32)
            del mapped
        except UserInputError:
            raise
        except (ValueError, OSError, EOFError, TypeError, SyntaxError) as err:  # not .npy, truncated, objects
            raise UserInputError(f"{cent_path}: not a .npy array of floats ({err})") from None
        if not np.isfinite(centroids).all():
            raise UserInputError(f"{cent_path}: centroids hold NaN or inf")
        return cls(centroids=centroids, meta=meta)


def fit_kmeans(
    rows: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    batch_size: int = 10000,
    max_iter: int = 100,
    max_no_improvement: int = 100,
    n_init: int = 20,
    init_size: int | None = None,
    reassignment_ratio: float = 0.0,
) -> KMeansModel:
    """Fit scikit-learn's ``MiniBatchKMeans`` with k-means++ init (fairseq HuBERT's settings).

    Args:
        rows: ``[N, D]`` features, N >= k.
        k: number of clusters.
        seed: random state.
        batch_size, max_iter, max_no_improvement, n_init, init_size, reassignment_ratio: passed on.

    Returns:
        The fitted :class:`KMeansModel` (meta has ``inertia`` per row and the settings).
    """
    from sklearn.cluster import MiniBatchKMeans  # type: ignore[import-untyped]

    if rows.ndim != 2 or len(rows) < k:
        raise UserInputError(f"k-means needs at least k={k} feature rows, but has {len(rows)}")
    km = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        max_iter=max_iter,
        batch_size=min(batch_size, len(rows)),
        tol=0.0,
        max_no_improvement=max_no_improvement,
        init_size=init_size,
        n_init=n_init,
        reassignment_ratio=reassignment_ratio,
        random_state=seed,
        compute_labels=False,
    )
    km.fit(rows)
    centroids = km.cluster_centers_.astype(np.float32)
    model = KMeansModel(centroids=centroids, meta={})
    inertia = _inertia(model, rows)
    model.meta.update({"seed": seed, "num_rows": len(rows), "inertia_per_row": inertia})
    logger.info("k-means: k=%d on %d rows, inertia per row %.4g", k, len(rows), inertia)
    return model


def _inertia(model: KMeansModel, rows: np.ndarray) -> float:
    labels = model.predict(rows).numpy()
    return float(((rows - model.centroids[labels]) ** 2).sum() / max(len(rows), 1))


def iter_shard_utterances(directory: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """Each dumped utterance's ``[T, D]`` features, in dump order (one shard in memory at a time)."""
    for path in shard_paths(directory):
        rows = np.load(path, mmap_mode="r")
        lengths = [int(n) for n in path.with_suffix(".len").read_text().split()]
        offset = 0
        for n in lengths:
            yield np.asarray(rows[offset : offset + n])
            offset += n
