"""Batch collation: pad to the longest item and return lengths. Never crops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class AudioBatch:
    """A padded batch of waveforms."""

    waveforms: Tensor
    """``[B, S]`` float32 samples, zero-padded after each utterance's length."""
    lengths: Tensor
    """``[B]`` int64 valid samples per utterance."""
    indices: Tensor
    """``[B]`` int64 dataset indices."""
    texts: list[str] | None = None
    """Transcripts, when the dataset has labels."""
    num_dropped: int = 0
    """Items of this batch that failed to load (None) and were left out."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Dataset index -> reason for the left-out items (filled by :meth:`AudioDataset.collate`)."""

    def to(self, device: torch.device | str) -> AudioBatch:
        """Move the tensors to ``device``."""
        return AudioBatch(
            waveforms=self.waveforms.to(device),
            lengths=self.lengths.to(device),
            indices=self.indices.to(device),
            texts=self.texts,
            num_dropped=self.num_dropped,
            skipped=self.skipped,
        )

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def pin_memory(self) -> AudioBatch:
        """Pinned-memory copy (DataLoader ``pin_memory=True`` calls this)."""
        return AudioBatch(
            waveforms=self.waveforms.pin_memory(),
            lengths=self.lengths.pin_memory(),
            indices=self.indices.pin_memory(),
            texts=self.texts,
            num_dropped=self.num_dropped,
            skipped=self.skipped,
        )


def collate_audio(items: list[dict[str, Any] | None]) -> AudioBatch:
    """Pad a list of dataset items into an :class:`AudioBatch`.

    Args:
        items: dicts with ``"index"``, ``"waveform"`` (``[S]``) and optionally ``"text"``; ``None``
            entries (items that failed to load) are dropped and counted in ``num_dropped``.

    Returns:
        The batch; ``waveforms`` is ``[B, max S]`` (``[0, 0]`` when every item was dropped).
    """
    good = [it for it in items if it is not None]
    dropped = len(items) - len(good)
    if not good:
        return AudioBatch(
            waveforms=torch.zeros(0, 0),
            lengths=torch.zeros(0, dtype=torch.long),
            indices=torch.zeros(0, dtype=torch.long),
            texts=None,
            num_dropped=dropped,
        )
    sizes = [int(it["waveform"].numel()) for it in good]
    # numpy padding: single-threaded, so it does not contend with the model's intra-op threads
    padded = np.zeros((len(good), max(sizes)), dtype=np.float32)
    for row, (it, n) in enumerate(zip(good, sizes)):
        padded[row, :n] = it["waveform"].numpy()
    waveforms = torch.from_numpy(padded)
    lengths = torch.tensor(sizes, dtype=torch.long)
    indices = torch.tensor([int(it["index"]) for it in good], dtype=torch.long)
    texts = [it["text"] for it in good] if all("text" in it for it in good) else None
    return AudioBatch(waveforms=waveforms, lengths=lengths, indices=indices, texts=texts, num_dropped=dropped)
