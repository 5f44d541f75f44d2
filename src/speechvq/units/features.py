"""BERT features for acoustic models (vq-wav2vec section 5.2): units -> unit BERT layer -> frames.

:class:`UnitBertFeatures` is a front end: it takes token ids (the dictionary ids of the units, or of
their BPE pieces), frames them with ``<s> ... </s>``, runs the embeddings and the first ``layer``
Transformer blocks of a trained unit BERT, drops the special positions, and expands each token to
the frames it stands for. A CTC head on top trains an acoustic model on discrete units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from speechvq.units.dictionary import UnitDictionary


class UnitBertFeatures(nn.Module):
    """Hidden states of one unit BERT layer, per frame.

    Args:
        masked_lm: a transformers ``BertForMaskedLM``/``RobertaForMaskedLM`` (the LM head is
            dropped; blocks after ``layer`` are dropped too).
        dictionary: its dictionary (for ``<s>``, ``</s>`` and ``<pad>``).
        layer: 0 = embeddings, ``l`` = output of block ``l`` (1-based); None = the last block.
        max_positions: longest sequence the model takes, specials included; longer inputs run in
            consecutive windows of ``max_positions - 2`` tokens.
        all_layers: return every layer up to ``layer`` (embeddings first), stacked on a new first
            dimension, for a learned mix of layers (:class:`LayerMix`).
    """

    def __init__(
        self,
        masked_lm: nn.Module,
        dictionary: UnitDictionary,
        layer: int | None = None,
        max_positions: int = 512,
        all_layers: bool = False,
    ) -> None:
        super().__init__()
        body: Any = masked_lm.base_model
        depth = len(body.encoder.layer)
        layer = depth if layer is None else layer
        if not 0 <= layer <= depth:
            raise ValueError(f"`layer` must be in [0, {depth}], but is {layer} instead.")
        body.encoder.layer = body.encoder.layer[:layer]
        self.body: Any = body
        self.layer = layer
        self.all_layers = all_layers
        self.dim = int(body.config.hidden_size)
        self.window = max_positions - 2
        self.bos_id, self.eos_id, self.pad_id = dictionary.bos_id, dictionary.eos_id, dictionary.pad_id

    def _run(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, N]`` content ids (N <= window) -> ``[B, N, D]`` hidden states (``[B, N, L + 1, D]``
        with ``all_layers``)."""
        batch, n = ids.shape
        framed = torch.full((batch, n + 2), self.pad_id, dtype=ids.dtype, device=ids.device)
        framed[:, 0] = self.bos_id
        pos = torch.arange(n + 2, device=ids.device)[None, :]
        inner = (pos >= 1) & (pos <= lengths[:, None])
        framed[:, 1 : n + 1] = torch.where(inner[:, 1 : n + 1], ids, framed[:, 1 : n + 1])
        framed[torch.arange(batch), lengths + 1] = self.eos_id
        attention = (pos < (lengths + 2)[:, None]).long()
        if self.layer == 0:
            # With no blocks left, transformers (5.x) returns no hidden states at all: the
            # embeddings' output is hidden_states[0] of the full model.
            states: tuple[Tensor, ...] = (self.body.embeddings(input_ids=framed),)
        else:
            out = self.body(input_ids=framed, attention_mask=attention, output_hidden_states=True)
            states = out.hidden_states
        if self.all_layers:
            return torch.stack(states, dim=2)[:, 1 : n + 1]  # (B, N + 2, L + 1, D), <s> and tail dropped
        return states[self.layer][:, 1 : n + 1]

    def forward(self, ids: Tensor, lengths: Tensor, repeats: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Frame features of token sequences.

        Args:
            ids: ``[B, N]`` content token ids (no ``<s>``/``</s>``), any padding value.
            lengths: ``[B]`` tokens per sequence.
            repeats: ``[B, N]`` frames each token stands for (durations of deduplicated units,
                units per BPE piece); None: one frame per token.

        Returns:
            Features ``[B, T, D]`` (zero after each length; ``[B, T, L + 1, D]`` with
            ``all_layers``) and frame lengths ``[B]``.
        """
        batch, n = ids.shape
        parts = []
        for start in range(0, max(n, 1), self.window):
            chunk_len = (lengths - start).clamp(min=0, max=self.window)
            width = min(self.window, n - start)
            parts.append(self._run(ids[:, start : start + width], chunk_len))
        tail = (self.layer + 1, self.dim) if self.all_layers else (self.dim,)
        hidden = torch.cat(parts, dim=1) if parts else ids.new_zeros(batch, 0, *tail).float()
        valid = torch.arange(n, device=ids.device)[None, :] < lengths[:, None]
        hidden = hidden * valid.view(batch, n, *[1] * len(tail)).to(hidden.dtype)
        if repeats is None:
            return hidden, lengths
        repeats = torch.where(valid, repeats, torch.zeros_like(repeats))
        frame_lengths = repeats.sum(dim=1)
        out = hidden.new_zeros(batch, int(frame_lengths.max()) if batch else 0, *tail)
        for b in range(batch):
            expanded = torch.repeat_interleave(hidden[b], repeats[b], dim=0)  # (N, D) -> (T_b, D)
            out[b, : expanded.size(0)] = expanded
        return out, frame_lengths


class LayerMix(nn.Module):
    """A learned softmax-weighted sum of stacked layers (SUPERB's weighted sum; ELMo's scalar mix).

    The weights start equal; each layer is LayerNorm-ed (without parameters) first, so that layers
    of different scales mix on equal terms. Runs outside a frozen BERT's ``no_grad``: the mix trains
    from the first update.

    Args:
        num_layers: L + 1 stacked layers (embeddings included).
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, stacked: Tensor) -> Tensor:
        """``[B, T, L + 1, D]`` -> ``[B, T, D]``."""
        normed = nn.functional.layer_norm(stacked, stacked.shape[-1:])
        weights = torch.softmax(self.logits.float(), dim=0).to(normed.dtype)
        return torch.einsum("btld,l->btd", normed, weights)
