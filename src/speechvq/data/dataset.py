"""The training dataset: decode, check, crop; a bad item is skipped and counted, never a crash."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from speechvq.data.audio import RawFormat, normalize_waveform
from speechvq.data.augment import WaveAugmenter
from speechvq.data.checks import CATEGORIES, categorize, transcript_problem
from speechvq.data.collate import AudioBatch, collate_audio
from speechvq.data.source import AudioSource, open_source
from speechvq.errors import UserInputError

logger = logging.getLogger(__name__)


class AudioDataset(torch.utils.data.Dataset):
    """Utterances of a manifest or local Hugging Face dataset, as mono float32 waveforms.

    Items shorter than ``min_sample_size`` samples are filtered once, at construction, from the
    listed lengths, and the dropped count is logged (``num_filtered``); items longer than
    ``max_sample_size`` are cropped when loaded. An item that fails
    later (missing, corrupt, NaN/inf, length mismatch, bad transcript) makes ``__getitem__`` return
    ``None``; :func:`collate_audio` drops it, and :meth:`bad_items` counts such items in every
    process, DataLoader workers included (the per-item status lives in shared memory).

    Args:
        source: a manifest ``.tsv``, or a local dataset (``save_to_disk`` dir, parquet, audiofolder).
        sample_rate: output rate in Hz (other rates are resampled).
        normalize: zero mean, unit variance per utterance (for ``layer_norm`` feature encoders).
        normalize_eps: added to the variance (the model config's ``waveform_norm.eps``).
        max_sample_size: longer items are cropped to this many samples: at a random offset
            determined by (seed, epoch, index) when ``random_crop``, else from the start.
        min_sample_size: items with fewer listed samples are dropped at construction.
        random_crop: random (training) or deterministic (evaluation) crop.
        seed: crop seed.
        labels: manifest: a label file, ``"ltr"``/``"wrd"`` beside the manifest, or a list of
            strings; dataset: the text column. Items then carry ``"text"``.
        vocab: allowed transcript characters; items with others are skipped. None: no check.
        raw_format: how to read headerless PCM files.
        augment: applied to each loaded waveform before the crop and the normalisation, with a
            generator determined by (seed, epoch, index) (a stream distinct from the crop's, so
            the crops are those of an unaugmented dataset where the lengths agree). Speed
            perturbation changes an item's length by up to a factor ``1/f``, so it can be shorter
            or longer than ``sizes`` says (still at most ``max_sample_size``). None: no
            augmentation (use it for validation).

    Attributes:
        sizes: ``[N]`` int64 samples each kept item will have (listed length at ``sample_rate``,
            capped at ``max_sample_size``); feed it to :class:`BucketBatchSampler`.
        raw_sizes: ``[N]`` int64 listed lengths before the cap.
    """

    def __init__(
        self,
        source: str | os.PathLike | AudioSource,
        *,
        sample_rate: int = 16000,
        normalize: bool = False,
        normalize_eps: float = 1e-5,
        max_sample_size: int | None = None,
        min_sample_size: int | None = None,
        random_crop: bool = True,
        seed: int = 0,
        labels: str | os.PathLike | list[str] | None = None,
        vocab: frozenset[str] | set[str] | None = None,
        raw_format: RawFormat | None = None,
        augment: WaveAugmenter | None = None,
    ) -> None:
        if max_sample_size is not None and max_sample_size <= 0:
            raise ValueError(f"`max_sample_size` must be positive, but is {max_sample_size} instead.")
        if min_sample_size is not None and max_sample_size is not None and min_sample_size > max_sample_size:
            raise ValueError(
                f"`min_sample_size` must be <= max_sample_size ({max_sample_size}), but is {min_sample_size} instead."
            )
        self.source = source if isinstance(source, AudioSource) else open_source(source, labels)
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.normalize_eps = normalize_eps
        self.max_sample_size = max_sample_size
        self.min_sample_size = min_sample_size
        self.random_crop = random_crop
        self.seed = seed
        self.vocab = None if vocab is None else frozenset(vocab)
        self.raw_format = raw_format
        self.augment = augment
        self.epoch = 0

        all_sizes = self.source.sizes(sample_rate)
        keep = np.ones(len(all_sizes), dtype=bool)
        if min_sample_size is not None:
            short = all_sizes < min_sample_size
            keep &= ~short
            if short.any():
                logger.info(
                    "%s: dropped %d of %d items shorter than %d samples (%.1f s of audio)",
                    self.source.description,
                    int(short.sum()),
                    len(all_sizes),
                    min_sample_size,
                    all_sizes[short].sum() / sample_rate,
                )
        self.num_filtered = int((~keep).sum())
        self.keep = np.flatnonzero(keep)
        self.raw_sizes = all_sizes[self.keep]
        self.sizes = (
            self.raw_sizes if max_sample_size is None else np.minimum(self.raw_sizes, max_sample_size)
        )
        if max_sample_size is not None:
            cropped = int((self.raw_sizes > max_sample_size).sum())
            if cropped:
                logger.info(
                    "%s: %d items longer than %d samples will be cropped (%s)",
                    self.source.description,
                    cropped,
                    max_sample_size,
                    "randomly" if random_crop else "from the start",
                )
        # per-item status in shared memory: 0 = fine/unknown, k = CATEGORIES[k - 1]
        self._status = torch.zeros(len(self.keep), dtype=torch.int8).share_memory_()
        self._recent: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self.keep)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for the random crops and augmentations."""
        self.epoch = epoch

    def _crop_start(self, index: int, length: int) -> int:
        assert self.max_sample_size is not None
        excess = length - self.max_sample_size
        if excess <= 0 or not self.random_crop:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, excess + 1))

    def _fail(self, index: int, category: str, reason: str) -> None:
        if self._status[index] == 0:
            logger.warning("skipping item %d: %s", index, reason)
        self._status[index] = CATEGORIES.index(category) + 1
        if len(self._recent) < 10_000:  # drained by collate(); bounded if another collate_fn is used
            self._recent.append((index, reason))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """``{"index", "waveform": [S] float32, "text"?}``, or None for a bad item (logged, counted)."""
        j = int(self.keep[index])
        utt = self.source.utterance(j)
        item: dict[str, Any] = {"index": index}
        if self.source.texts is not None:
            raw = self.source.text(j)
            problem = transcript_problem(raw, self.vocab)
            if problem is not None:
                self._fail(index, problem[0], f"{utt.name}: {problem[1]}")
                return None
            item["text"] = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        try:
            wav = self.source.load(j, self.sample_rate, self.raw_format)
        except UserInputError as err:
            self._fail(index, categorize(str(err)), str(err))
            return None
        except Exception as err:  # a decoder bug must not end an epoch either
            self._fail(index, "other", f"{utt.name}: {type(err).__name__}: {err}")
            return None
        if wav.size == 0:
            self._fail(index, "empty", f"{utt.name}: has no samples")
            return None
        if self.min_sample_size is not None and wav.size < self.min_sample_size:
            self._fail(
                index, "too_short", f"{utt.name}: {wav.size} samples < min_sample_size {self.min_sample_size}"
            )
            return None
        if self.augment is not None:
            # before the crop, so a crop of a slowed-down utterance is still max_sample_size long
            # and reverberation carries into the crop from before it
            wav = self.augment(wav, np.random.default_rng([self.seed, self.epoch, index, 1]))
        if self.max_sample_size is not None and wav.size > self.max_sample_size:
            start = self._crop_start(index, wav.size)
            wav = wav[start : start + self.max_sample_size]
        out = torch.from_numpy(np.ascontiguousarray(wav))
        item["waveform"] = normalize_waveform(out, self.normalize_eps) if self.normalize else out
        return item

    def bad_items(self) -> dict[str, int]:
        """Count of skipped items per problem category, over all processes (and epochs so far)."""
        codes = self._status.numpy()
        return {CATEGORIES[k - 1]: int((codes == k).sum()) for k in np.unique(codes) if k > 0}

    def num_bad(self) -> int:
        """Number of distinct items skipped so far."""
        return int((self._status > 0).sum())

    def collate(self, items: Sequence[dict[str, Any] | None]) -> AudioBatch:
        """:func:`collate_audio`, plus ``skipped`` (index -> reason) for this batch's failures.

        Runs in the process that loaded the items, so it also sees failures in DataLoader workers.
        """
        batch = collate_audio(list(items))
        batch.skipped = dict(self._recent)
        self._recent.clear()
        return batch

    def log_epoch_report(self, epoch: int | None = None) -> dict[str, int]:
        """Log (and return) the skipped-item counts at the end of an epoch."""
        counts = self.bad_items()
        total = sum(counts.values())
        label = f"epoch {self.epoch if epoch is None else epoch}"
        if total:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            logger.warning("%s: skipped %d of %d items (%s)", label, total, len(self), detail)
        else:
            logger.info("%s: no items skipped", label)
        return counts
