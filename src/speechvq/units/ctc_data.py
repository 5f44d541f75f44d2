"""Units with transcripts for CTC over unit-BERT features: tokenisation as the BERT was trained, the dataset, batches.

Each utterance's units (a ``speechvq export-units`` directory, one line per manifest item) are
tokenised as the unit BERT was trained: deduplicated or not (its ``unit_bert.json``), and split
into acoustic BPE pieces if it has a ``bpe.model``; each token keeps the number of frames it stands
for (``repeats``: run-length durations, times the units of a BPE piece). The model is
:mod:`speechvq.units.ctc`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.data.source import label_text, open_source
from speechvq.errors import UserInputError
from speechvq.units.bert import read_unit_bert_config
from speechvq.units.dictionary import UnitBpe, UnitDictionary
from speechvq.units.io import UNITS_NAME, UTTS_NAME, read_units, run_length_encode

logger = logging.getLogger(__name__)


class UnitTokenizer:
    """Units -> BERT token ids and the frames each token stands for, as the unit BERT was trained.

    Args:
        dictionary: the BERT's dictionary (of units, or of BPE pieces).
        bpe: its acoustic BPE, or None.
        dedup: whether the BERT was trained on deduplicated units.
    """

    def __init__(self, dictionary: UnitDictionary, bpe: UnitBpe | None, *, dedup: bool) -> None:
        self.dictionary, self.bpe, self.dedup = dictionary, bpe, dedup

    def encode(self, frames: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame units -> (``[N]`` int64 token ids, ``[N]`` int64 frames per token).

        The repeats sum to ``len(frames)``.
        """
        if self.dedup:
            values, durations = run_length_encode(list(frames))
            units, counts = [str(v) for v in values], np.asarray(durations, dtype=np.int64)
        else:
            units, counts = [str(f) for f in frames], np.ones(len(frames), dtype=np.int64)
        tokens = units
        if self.bpe is not None and units:
            tokens = self.bpe.encode(units)
            widths = np.asarray(self.bpe.piece_lengths(tokens), dtype=np.int64)
            if int(widths.sum()) != len(units):
                raise ValueError(f"BPE pieces cover {int(widths.sum())} units, but there are {len(units)}.")
            starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
            counts = np.add.reduceat(counts, starts)  # frames of each piece's units
        ids = self.dictionary.encode(tokens, add_specials=False)
        return ids, counts


def tokenizer_of(
    directory: str | os.PathLike[str], dictionary: UnitDictionary, bpe: UnitBpe | None
) -> UnitTokenizer:
    """The tokenizer of a unit-BERT export (its ``unit_bert.json`` says whether it saw deduplicated units)."""
    return UnitTokenizer(dictionary, bpe, dedup=read_unit_bert_config(Path(directory)).dedup)


@dataclass
class UnitCtcBatch:
    """A padded batch of tokenised utterances with their transcripts."""

    ids: Tensor
    """``[B, N]`` int64 token ids, padded with ``<pad>``."""
    lengths: Tensor
    """``[B]`` tokens per utterance."""
    repeats: Tensor
    """``[B, N]`` frames per token (0 past each length)."""
    indices: Tensor
    """``[B]`` dataset indices."""
    texts: list[str]
    """Per utterance, its label line."""

    def to(self, device: torch.device | str) -> UnitCtcBatch:
        return UnitCtcBatch(
            self.ids.to(device),
            self.lengths.to(device),
            self.repeats.to(device),
            self.indices.to(device),
            self.texts,
        )

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def frames(self) -> Tensor:
        """``[B]`` frames per utterance."""
        return self.repeats.sum(dim=1)


class UnitTranscriptDataset(torch.utils.data.Dataset):
    """The units of each manifest item paired with its label line (utterances without units are dropped).

    Args:
        manifest: the manifest (or dataset) whose labels are read.
        units_dir: its units, one line per item in the same order (``export-units``).
        tokenizer: units -> BERT tokens and repeats.
        labels: ``ltr``/``wrd`` (the label file beside the manifest).

    Raises:
        UserInputError: when the units and the manifest disagree (line count, utterance paths).
    """

    def __init__(
        self, manifest: str, units_dir: str | os.PathLike[str], tokenizer: UnitTokenizer, labels: str
    ) -> None:
        source = open_source(manifest, labels)
        units = read_units(units_dir)
        units_path = Path(units_dir)
        units_file = units_path if units_path.is_file() else units_path / UNITS_NAME
        if len(units) != len(source):
            raise UserInputError(
                f"{units_file}: has {len(units)} lines, but the manifest {manifest} has {len(source)} items "
                "(export the units of this manifest)"
            )
        _check_order(manifest, units_path, units.utterances if units.meta else None)
        self.items: list[tuple[np.ndarray, np.ndarray, str]] = []
        self.source_indices: list[int] = []
        self._skipped: dict[str, int] = {}
        for i in range(len(units)):
            ids, repeats = tokenizer.encode(units.frames(i))
            if len(ids) == 0:
                self._skipped["empty"] = self._skipped.get("empty", 0) + 1
                continue
            try:
                text = label_text(source.text(i))
            except UnicodeDecodeError:
                self._skipped["bad_transcript"] = self._skipped.get("bad_transcript", 0) + 1
                continue
            self.items.append((ids, repeats, text))
            self.source_indices.append(i)
        if self._skipped:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self._skipped.items()))
            logger.warning(
                "%s: %d of %d utterance(s) skipped (empty: without units; bad_transcript: not UTF-8) (%s)",
                units_file, sum(self._skipped.values()), len(units), detail,
            )  # fmt: skip
        self.sizes = np.asarray([int(r.sum()) for _, r, _ in self.items], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        pass

    def bad_items(self) -> dict[str, int]:
        """Utterances left out, by reason (``empty``: no units; ``bad_transcript``: not UTF-8)."""
        return dict(self._skipped)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, repeats, text = self.items[index]
        return {
            "index": index,
            "ids": torch.from_numpy(ids),
            "repeats": torch.from_numpy(repeats),
            "text": text,
        }


def _check_order(manifest: str, units_dir: Path, utterances: list[str] | None) -> None:
    """With a ``.tsv`` manifest and an ``utts.txt``, every line must name the manifest's item."""
    if utterances is None or not (units_dir / UTTS_NAME).is_file() or not manifest.endswith((".tsv", ".txt")):
        return
    from speechvq.data.manifest import read_manifest

    for lineno, (item, utt) in enumerate(zip(read_manifest(manifest).items, utterances), start=1):
        if item.relpath != utt:
            raise UserInputError(
                f"{units_dir / UTTS_NAME}:{lineno}: names {utt!r}, but item {lineno} of {manifest} is "
                f"{item.relpath!r} (units of another manifest?)"
            )


def collate_unit_transcripts(items: list[dict[str, Any]], pad_id: int) -> UnitCtcBatch:
    """Pad dataset items into a :class:`UnitCtcBatch`."""
    lengths = torch.tensor([len(it["ids"]) for it in items], dtype=torch.long)
    width = int(lengths.max()) if items else 0
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    repeats = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["ids"])] = it["ids"]
        repeats[row, : len(it["repeats"])] = it["repeats"]
    indices = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return UnitCtcBatch(ids, lengths, repeats, indices, [it["text"] for it in items])
