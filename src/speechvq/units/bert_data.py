"""Unit corpora for a unit BERT: tokenisation (dictionary, acoustic BPE), datasets, batches and the
baselines a trained BERT must beat. The model and its objective are :mod:`speechvq.units.bert`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.units.bert import BASE_DICT_NAME, BPE_NAME, DICT_NAME, UnitBertConfig
from speechvq.units.dictionary import UnitBpe, UnitDictionary
from speechvq.units.io import read_units


@dataclass
class UnitBatch:
    """A padded batch of token sequences (``<s> ... </s>``)."""

    ids: Tensor
    """``[B, N]`` int64, padded with ``<pad>``."""
    lengths: Tensor
    """``[B]`` tokens per sequence, ``<s>`` and ``</s>`` included."""
    indices: Tensor
    """``[B]`` dataset indices."""

    def to(self, device: torch.device | str) -> UnitBatch:
        return UnitBatch(self.ids.to(device), self.lengths.to(device), self.indices.to(device))

    def __len__(self) -> int:
        return int(self.lengths.numel())


class UnitDataset(torch.utils.data.Dataset):
    """Tokenised utterances, cropped to ``max_len`` tokens (``<s>``/``</s>`` included).

    Args:
        sequences: per utterance, its ``[N]`` content ids (no ``<s>``/``</s>``).
        dictionary: for the special ids.
        max_len: longest item; longer ones are cropped at a random offset (``random_crop``,
            determined by (seed, epoch, index)) or from the start.
    """

    def __init__(
        self,
        sequences: list[np.ndarray],
        dictionary: UnitDictionary,
        max_len: int,
        *,
        random_crop: bool = True,
        seed: int = 0,
    ) -> None:
        keep = [i for i, s in enumerate(sequences) if len(s) > 0]
        self.sequences = [sequences[i] for i in keep]
        self.dictionary = dictionary
        self.max_len = max_len
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.sizes = np.asarray([min(len(s), max_len - 2) + 2 for s in self.sequences], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        seq = self.sequences[index]
        room = self.max_len - 2
        start = 0
        if len(seq) > room and self.random_crop:
            start = int(
                np.random.default_rng([self.seed, self.epoch, index]).integers(0, len(seq) - room + 1)
            )
        body = seq[start : start + room]
        d = self.dictionary
        ids = np.concatenate([[d.bos_id], body, [d.eos_id]]).astype(np.int64)
        return {"index": index, "ids": torch.from_numpy(ids)}


def collate_units(items: list[dict[str, Any]], pad_id: int) -> UnitBatch:
    """Pad dataset items into a :class:`UnitBatch`."""
    lengths = torch.tensor([len(it["ids"]) for it in items], dtype=torch.long)
    ids = torch.full((len(items), int(lengths.max()) if items else 0), pad_id, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["ids"])] = it["ids"]
    return UnitBatch(ids=ids, lengths=lengths, indices=torch.tensor([int(it["index"]) for it in items]))


class UnitCorpus:
    """The unit corpora of a unit BERT, tokenised: dictionary (and acoustic BPE), token sequences,
    datasets and the collator.

    The dictionary (and, with ``cfg.bpe_vocab_size``, the BPE model) is read from ``work_dir`` if
    it is there, else built from the training units and written there.

    Args:
        cfg: the model, masking and data settings (``dedup``, ``bpe_vocab_size``, ``max_positions``).
        units_dir: the training units (an ``export-units`` directory).
        valid_units_dir: optional validation units.
        work_dir: where ``dict.txt`` (and ``bpe.model``) live.
        seed: crop seed.
    """

    def __init__(
        self,
        cfg: UnitBertConfig,
        units_dir: str | os.PathLike[str],
        valid_units_dir: str | os.PathLike[str] | None = None,
        *,
        work_dir: str | os.PathLike[str],
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        train_units = self._unit_strings(units_dir)
        self.base_dictionary, self.bpe, self.dictionary = self._vocab(train_units)
        self.train_sequences = self._encode(train_units)
        """Per training utterance, its ``[N]`` content ids."""
        self.valid_sequences = self._encode(self._unit_strings(valid_units_dir)) if valid_units_dir else None

    def _unit_strings(self, directory: str | os.PathLike[str]) -> list[list[str]]:
        units = read_units(directory)
        if self.cfg.dedup:
            return [[str(t) for t in _dedup(units.frames(i))] for i in range(len(units))]
        return [units.frames(i) for i in range(len(units))]

    def _vocab(self, corpus: list[list[str]]) -> tuple[UnitDictionary, UnitBpe | None, UnitDictionary]:
        if self.cfg.bpe_vocab_size <= 0:
            path = self.work_dir / DICT_NAME
            d = UnitDictionary.load(path) if path.is_file() else UnitDictionary.build(corpus)
            d.save(path)
            return d, None, d
        base_path, bpe_path = self.work_dir / BASE_DICT_NAME, self.work_dir / BPE_NAME
        base = UnitDictionary.load(base_path) if base_path.is_file() else UnitDictionary.build(corpus)
        base.save(base_path)
        if bpe_path.is_file():
            bpe = UnitBpe(bpe_path, base)
        else:
            bpe = UnitBpe.train(corpus, base, self.cfg.bpe_vocab_size, self.work_dir / "bpe")
        path = self.work_dir / DICT_NAME
        d = (
            UnitDictionary.load(path)
            if path.is_file()
            else UnitDictionary.build(bpe.encode(u) for u in corpus)
        )
        d.save(path)
        return base, bpe, d

    def tokenize(self, units: list[str]) -> list[str]:
        """The BERT tokens of a unit sequence (its BPE pieces, or the units themselves)."""
        return self.bpe.encode(units) if self.bpe is not None else list(units)

    def _encode(self, corpus: list[list[str]]) -> list[np.ndarray]:
        return [self.dictionary.encode(self.tokenize(u), add_specials=False).astype(np.int32) for u in corpus]

    def train_dataset(self) -> UnitDataset:
        return UnitDataset(
            self.train_sequences, self.dictionary, self.cfg.max_positions, random_crop=True, seed=self.seed
        )

    def valid_dataset(self) -> UnitDataset | None:
        if self.valid_sequences is None:
            return None
        return UnitDataset(self.valid_sequences, self.dictionary, self.cfg.max_positions, random_crop=False)

    def collate(self, items: list[dict[str, Any]]) -> UnitBatch:
        return collate_units(items, self.dictionary.pad_id)

    def batch_sizes(self) -> np.ndarray:
        """``[N]`` tokens per training item, for :class:`~speechvq.data.BucketBatchSampler`."""
        return self.train_dataset().sizes


def unigram_baseline(sequences: list[np.ndarray], dictionary: UnitDictionary) -> tuple[Tensor, int]:
    """The two baselines a unit BERT must beat, from the training token sequences: ``[V]``
    log-probabilities of the add-one-smoothed unigram distribution over the units (specials get
    none), and the id of the most frequent unit.

    A model that learns only how often each unit occurs reaches the unigram cross-entropy on the
    masked tokens, and one that always predicts the commonest unit reaches its share as accuracy;
    an MLM loss above the first or an accuracy below the second means the BERT has not used the
    context at all.
    """
    counts = np.zeros(len(dictionary), dtype=np.float64)
    for seq in sequences:
        counts += np.bincount(np.asarray(seq, dtype=np.int64), minlength=len(dictionary))
    units = np.zeros(len(dictionary), dtype=bool)
    units[dictionary.first_unit_id : dictionary.mask_id] = True
    counts = np.where(units, counts + 1.0, 0.0)
    with np.errstate(divide="ignore"):
        logp = np.log(counts / counts.sum())
    majority = int(np.argmax(np.where(units, counts, -1.0)))
    return torch.from_numpy(logp), majority


def _dedup(tokens: list[str]) -> list[str]:
    return [t for i, t in enumerate(tokens) if i == 0 or tokens[i - 1] != t]
