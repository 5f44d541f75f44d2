"""The context network's fast CPU forms (:mod:`speechvq.models.context` is the plain one).

On the CPU a padded batch runs through the Transformer blocks packed, its valid frames only, each
utterance attending within itself (GPUs keep the padded layout, which suits their kernels); the
results at valid frames are the padded layout's. With dropout, attention is SDPA's math path with
the faster dropout sampler (the CPU has no fused kernel with dropout), and the positional conv's
input gradient is a forward convolution (:class:`GroupedConvFlippedBackward`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

from speechvq.models.common import lengths_to_padding_mask
from speechvq.models.context import ContextNetwork, ContextOutput, ConvPositionalEmbedding, SelfAttention
from speechvq.models.kernels import lowp_guard
from speechvq.models.kernels.dropout import dropout
from speechvq.models.kernels.grouped_conv import GroupedConvFlippedBackward


@dataclass(frozen=True)
class Packed:
    """The packed layout, passed to the blocks in place of a padding mask: ``[N, D]`` states
    holding each utterance's valid frames in turn."""

    seq_lens: list[int]
    """Frames of each utterance, summing to N."""


class FastConvPositionalEmbedding(ConvPositionalEmbedding):
    """:class:`~speechvq.models.context.ConvPositionalEmbedding` whose CPU conv has a forward-form
    input gradient (:class:`GroupedConvFlippedBackward`)."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        x = x.transpose(1, 2)  # (B, T, D) -> (B, D, T)
        if x.device.type == "cpu":
            conv = self.conv
            weight, bias = conv.weight, conv.bias
            if torch.is_autocast_enabled("cpu"):  # what autocast does to a conv, done up front
                dtype = torch.get_autocast_dtype("cpu")
                x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
            with torch.autocast("cpu", enabled=False):
                # bf16 / fp16 checked once per shape (oneDNN's bf16 grouped conv with 8 channels
                # per group is wrong on AMX CPUs)
                y = lowp_guard.call("grouped_conv1d", self._shape, self._conv, [x, weight, bias], self._probe)
        else:
            y = self.conv(x)  # (B, D, T')
        if self.remove_last:
            y = y[:, :, :-1]  # an even kernel yields T + 1 frames
        return F.gelu(y).transpose(1, 2)  # (B, D, T) -> (B, T, D)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The CPU conv, ``[B, D, T]`` -> ``[B, D, T']``, in the inputs' dtype."""
        return GroupedConvFlippedBackward.apply(x, weight, bias, self.conv.padding[0], self.conv.groups)

    @property
    def _shape(self) -> str:
        conv = self.conv
        return f"channels {conv.in_channels}, groups {conv.groups}, kernel {conv.kernel_size[0]}"

    def _probe(self, generator: torch.Generator) -> list[Tensor]:
        """:mod:`lowp_guard`'s probe: 2 utterances of 50 frames, this conv's weight shape."""
        conv = self.conv
        shape = (conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size[0])
        return lowp_guard.randn_inputs((2, conv.in_channels, 50), shape, (conv.out_channels,))(generator)


class FastSelfAttention(SelfAttention):
    """:class:`~speechvq.models.context.SelfAttention` over the packed or padded layout; with
    dropout on the CPU, SDPA's math path with :func:`dropout`."""

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | Packed | None = None, rows: Tensor | None = None
    ) -> Tensor:
        """Attend within each utterance.

        Args:
            x: ``[B, T, D]`` padded, or ``[N, D]``: utterances packed one after another.
            key_padding_mask: ``[B, T]`` True at padding (padded layout), or :class:`Packed`.
            rows: ``[R]`` flat frame indices into ``x.reshape(-1, D)``; if given, the output is
                ``[R, D]``, projected at those frames only.
        """
        seq_lens = None
        if isinstance(key_padding_mask, Packed):
            seq_lens, key_padding_mask = key_padding_mask.seq_lens, None
        dim, heads = x.size(-1), self.num_heads
        # one matmul for q, k and v (the three projections stay separate modules for checkpoints)
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = self.q_proj.linear(x, weight, bias)  # (..., 3D)
        if seq_lens is None:
            batch, frames, _ = x.shape
            qkv = qkv.view(batch, frames, 3, heads, dim // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, T, 3, H, D/H) -> 3 x (B, H, T, D/H)
            y = self._attend(q, k, v, key_padding_mask)
            y = y.transpose(1, 2).reshape(batch, frames, dim)  # (B, H, T, D/H) -> (B, T, D)
        else:
            parts = []
            for part in qkv.split(seq_lens):
                frames = part.size(0)
                q, k, v = part.view(frames, 3, heads, dim // heads).permute(1, 2, 0, 3)  # 3 x (H, T, D/H)
                parts.append(self._attend(q, k, v, None).transpose(0, 1).reshape(frames, dim))  # -> (T, D)
            y = torch.cat(parts)
        if rows is not None:
            y = y.reshape(-1, dim)[rows]
        return self.out_proj(y)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """``[..., H, T, D/H]`` q, k, v -> attention output of the same shape."""
        dropout_p = self.dropout_p if self.training else 0.0
        # the CPU has no fused kernel with dropout: SDPA's math path, with the faster dropout
        attend = _attention_math if dropout_p > 0.0 and q.device.type == "cpu" else _attention_sdpa
        if key_padding_mask is not None or lowp_guard.low_precision_dtype(q) is None:
            # (a padding mask is a GPU layout: on the CPU the blocks run packed, unmasked)
            return attend(q, k, v, key_padding_mask, dropout_p)
        heads, head_dim = q.size(-3), q.size(-1)
        dtype = lowp_guard.low_precision_dtype(q)
        assert dtype is not None
        how = lowp_guard.mode(
            "attention",
            f"heads {heads}, head dim {head_dim}, {'math' if attend is _attention_math else 'sdpa'}",
            dtype,
            lambda q, k, v: attend(q, k, v, None, 0.0),  # the probe: the same path without dropout
            lambda g: [torch.randn(heads, 48, head_dim, generator=g) for _ in range(3)],
        )
        if how == lowp_guard.NATIVE:
            return attend(q, k, v, None, dropout_p)
        return lowp_guard.island(how, dtype, lambda q, k, v: attend(q, k, v, None, dropout_p), [q, k, v])


def _attention_math(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, dropout_p: float
) -> Tensor:
    """Attention as SDPA's math path computes it, with :func:`dropout` of the probabilities."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (..., H, T, T)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = dropout(torch.softmax(scores, dim=-1), dropout_p, True)
    return probs.to(v.dtype) @ v


def _attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, dropout_p: float
) -> Tensor:
    """Attention through ``F.scaled_dot_product_attention``."""
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = ~key_padding_mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def pack(x: Tensor, seq_lens: list[int]) -> Tensor:
    """``[B, T, D]`` padded -> ``[N, D]``: each utterance's first ``seq_lens[b]`` frames in turn."""
    return torch.cat([x[b, :n] for b, n in enumerate(seq_lens)])


def unpack(x: Tensor, seq_lens: list[int], frames: int) -> Tensor:
    """``[N, D]`` packed -> ``[B, T, D]`` with zeros at padding; the inverse of :func:`pack`."""
    return torch.stack([F.pad(part, (0, 0, 0, frames - part.size(0))) for part in x.split(seq_lens)])


class UnpackedStates(Sequence[Tensor]):
    """Packed ``[N, D]`` states seen as a sequence of ``[B, T, D]`` tensors, each unpacked when
    it is read (a training step that reads none of them copies none)."""

    def __init__(self, packed: list[Tensor], seq_lens: list[int], frames: int) -> None:
        self._packed, self._seq_lens, self._frames = packed, seq_lens, frames

    def __len__(self) -> int:
        return len(self._packed)

    @overload
    def __getitem__(self, index: int) -> Tensor: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Tensor, ...]: ...
    def __getitem__(self, index: int | slice) -> Tensor | tuple[Tensor, ...]:
        if isinstance(index, slice):
            return tuple(unpack(t, self._seq_lens, self._frames) for t in self._packed[index])
        return unpack(self._packed[index], self._seq_lens, self._frames)


class FastContextNetwork(ContextNetwork):
    """:class:`~speechvq.models.context.ContextNetwork` whose blocks run packed on the CPU."""

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        num_layers: int | None = None,
        layer_drop_generator: torch.Generator | None = None,
        output_frames: Tensor | None = None,
    ) -> ContextOutput:
        """:meth:`ContextNetwork.forward <speechvq.models.context.ContextNetwork.forward>`; its
        ``hidden_states`` are unpacked when read where the blocks ran packed."""
        if (
            output_frames is not None
            and padding_mask is not None
            and bool((output_frames & padding_mask).any())
        ):
            raise ValueError("`output_frames` must mark valid frames only, but marks padding.")
        frames = x.size(1)
        x, layout, seq_lens = self._embed_packed(x, padding_mask)
        rows = None  # the selected frames as flat indices into x.reshape(-1, D), either layout
        if output_frames is not None:
            selected = output_frames if seq_lens is None else pack(output_frames[..., None], seq_lens)
            rows = selected.reshape(-1).nonzero().squeeze(1)
        x, hidden = self._run_blocks(x, layout, rows, num_layers, layer_drop_generator)
        if self.layer_norm_first and num_layers is None:
            x = self.layer_norm(x)
        if seq_lens is None:
            return ContextOutput(last_hidden_state=x, hidden_states=tuple(hidden))
        if output_frames is None:  # with output_frames x is already [R, D] at the selected frames
            x = unpack(x, seq_lens, frames)
        return ContextOutput(last_hidden_state=x, hidden_states=UnpackedStates(hidden, seq_lens, frames))

    def _embed_packed(
        self, x: Tensor, padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | Packed | None, list[int] | None]:
        """The blocks' input: padding zeroed, the positional conv added, on the CPU the valid
        frames packed, then (post-LN) the LayerNorm and the dropout. Returns (``[B, T, D]``, the
        padding mask, None) or, packed, (``[N, D]``, :class:`Packed`, the utterances' frame counts)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        seq_lens = None
        if padding_mask is not None and x.device.type == "cpu":
            # on the CPU the blocks run on the valid frames only, packed: no padding is computed
            # and each utterance attends within itself (GPUs keep the padded layout, which suits
            # their kernels); the results at valid frames are the padded layout's
            frames = x.size(1)
            lengths = frames - padding_mask.sum(1)
            if not torch.equal(padding_mask, lengths_to_padding_mask(lengths, frames)):
                raise ValueError("`padding_mask` must mark a suffix of padded frames in each row.")
            seq_lens = lengths.tolist()
            x = pack(x, seq_lens)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        layout = padding_mask if seq_lens is None else Packed(seq_lens)
        return self.dropout(x), layout, seq_lens
