"""Transformer context network with a convolutional positional embedding (paper section 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from speechvq.config import ContextConfig
from speechvq.models.common import Dropout, Linear, dropout, lengths_to_padding_mask, linear
from speechvq.models.kernels import lowp_guard
from speechvq.models.kernels.grouped_conv import GroupedConvFlippedBackward


class ConvPositionalEmbedding(nn.Module):
    """Grouped conv over time with weight norm (dim=2), "same" padding, then GELU.

    The weight is stored as weight-norm magnitude/direction parametrizations, as transformers does.
    """

    def __init__(self, dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove_last = kernel_size % 2 == 0

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


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, dropout_p: float) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"`dim` must be a multiple of `num_heads` ({num_heads}), but is {dim} instead.")
        self.num_heads = num_heads
        self.dropout_p = dropout_p
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        seq_lens: list[int] | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Attend within each utterance.

        Args:
            x: ``[B, T, D]`` padded, or ``[N, D]``: utterances packed one after another.
            key_padding_mask: ``[B, T]`` True at padding (padded layout only).
            seq_lens: lengths of the packed utterances, summing to N (packed layout only).
            rows: ``[R]`` flat frame indices into ``x.reshape(-1, D)``; if given, the output is
                ``[R, D]``, projected at those frames only.
        """
        dim, heads = x.size(-1), self.num_heads
        # one matmul for q, k and v (the three projections stay separate modules for checkpoints)
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = linear(x, weight, bias)  # (..., 3D)
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


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, ffn_dim: int, activation_dropout_p: float, dropout_p: float) -> None:
        super().__init__()
        self.linear1 = Linear(dim, ffn_dim)
        self.activation_dropout = Dropout(activation_dropout_p)
        self.linear2 = Linear(ffn_dim, dim)
        self.dropout = Dropout(dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.activation_dropout(F.gelu(self.linear1(x)))))


class TransformerLayer(nn.Module):
    """One block; post-LN (BASE) or pre-LN (LARGE)."""

    def __init__(
        self,
        attention: SelfAttention,
        feed_forward: FeedForward,
        *,
        dim: int,
        dropout_p: float,
        layer_norm_first: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.dropout = Dropout(dropout_p)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.layer_norm_first = layer_norm_first

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        seq_lens: list[int] | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """``[B, T, D]`` with ``key_padding_mask``, or ``[N, D]`` packed with ``seq_lens`` (see
        :meth:`SelfAttention.forward`). With ``rows`` (flat frame indices into ``x.reshape(-1,
        D)``) the output is ``[R, D]``: every frame is attended to, but the queries' outputs, the
        feed-forward and the norms are computed at those frames only."""
        residual = x if rows is None else x.reshape(-1, x.size(-1))[rows]
        if self.layer_norm_first:
            attended = self.attention(self.attention_norm(x), key_padding_mask, seq_lens, rows)
            x = residual + self.dropout(attended)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(residual + self.dropout(self.attention(x, key_padding_mask, seq_lens, rows)))
        return self.ffn_norm(x + self.feed_forward(x))


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


@dataclass
class ContextOutput:
    """Output of :class:`ContextNetwork`."""

    last_hidden_state: Tensor
    """``[B, T, D]`` final output (after the final LayerNorm for pre-LN models); ``[R, D]``, the
    selected frames in row-major order, when the network ran with ``output_frames``."""
    hidden_states: Sequence[Tensor]
    """Input of the first block, then the output of each block that ran, each ``[B, T, D]``.
    Where the blocks ran packed (CPU, padded batch), each is unpacked when read, with zeros at
    padding. With ``output_frames`` the last block's output is left out (it exists at the
    selected frames only: ``last_hidden_state``)."""


class ContextNetwork(nn.Module):
    """Positional conv + Transformer blocks + LayerDrop. Build it with :func:`build_context_network`."""

    def __init__(
        self,
        pos_conv: ConvPositionalEmbedding,
        layers: nn.ModuleList,
        *,
        dim: int,
        dropout_p: float,
        layer_norm_first: bool,
        layer_drop_p: float,
        eps: float,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        self.pos_conv = pos_conv
        self.layers = layers
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = Dropout(dropout_p)
        self.layer_norm_first = layer_norm_first
        self.layer_drop_p = layer_drop_p

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        num_layers: int | None = None,
        layer_drop_generator: torch.Generator | None = None,
        output_frames: Tensor | None = None,
    ) -> ContextOutput:
        """Run the context network.

        Args:
            x: ``[B, T, D]`` (masked) projected features.
            padding_mask: ``[B, T]`` True at padded frames, which follow each utterance's valid
                frames (:func:`lengths_to_padding_mask`); they are zeroed before the positional
                conv, as if each utterance were alone, and never attended to.
            num_layers: run only the first ``num_layers`` blocks (no final LayerNorm then).
            layer_drop_generator: RNG for the LayerDrop decisions; give every data-parallel rank
                the same seed so that all ranks skip the same blocks.
            output_frames: ``[B, T]`` bool, the valid frames whose final output is needed (the
                masked frames, for the pretraining loss). The last block then computes its
                output, feed-forward and norms at these frames only, while still attending to
                every frame, so they equal the full run's; ``last_hidden_state`` is ``[R, D]``.

        Returns:
            :class:`ContextOutput`.

        Raises:
            ValueError: if ``padding_mask`` is not a suffix of each row, or ``output_frames``
                marks a padded frame.
        """
        if (
            output_frames is not None
            and padding_mask is not None
            and bool((output_frames & padding_mask).any())
        ):
            raise ValueError("`output_frames` must mark valid frames only, but marks padding.")
        frames = x.size(1)
        x, padding_mask, seq_lens = self._embed(x, padding_mask)
        rows = None  # the selected frames as flat indices into x.reshape(-1, D), either layout
        if output_frames is not None:
            selected = output_frames if seq_lens is None else pack(output_frames[..., None], seq_lens)
            rows = selected.reshape(-1).nonzero().squeeze(1)
        x, hidden = self._run_blocks(x, padding_mask, seq_lens, rows, num_layers, layer_drop_generator)
        if self.layer_norm_first and num_layers is None:
            x = self.layer_norm(x)
        if seq_lens is None:
            return ContextOutput(last_hidden_state=x, hidden_states=tuple(hidden))
        if output_frames is None:  # with output_frames x is already [R, D] at the selected frames
            x = unpack(x, seq_lens, frames)
        return ContextOutput(last_hidden_state=x, hidden_states=UnpackedStates(hidden, seq_lens, frames))

    def _embed(
        self, x: Tensor, padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None, list[int] | None]:
        """The blocks' input: padding zeroed, the positional conv added, on the CPU the valid
        frames packed, then (post-LN) the LayerNorm and the dropout. Returns (``[B, T, D]``, the
        padding mask) or, packed, (``[N, D]``, None, the utterances' frame counts)."""
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
            padding_mask = None
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x), padding_mask, seq_lens

    def _run_blocks(
        self,
        x: Tensor,
        padding_mask: Tensor | None,
        seq_lens: list[int] | None,
        rows: Tensor | None,
        num_layers: int | None,
        layer_drop_generator: torch.Generator | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """The first ``num_layers`` blocks (all if None) with LayerDrop: (the last output, the
        input and each output that ran). With ``rows`` the last block's output is ``[R, D]`` at
        those frames (and left out of the list); if it was dropped, they are read off its input."""
        hidden = [x]
        blocks = list(self.layers)[: len(self.layers) if num_layers is None else num_layers]
        for i, layer in enumerate(blocks):
            if self.training and self.layer_drop_p > 0.0:
                draw = torch.rand((), generator=layer_drop_generator)
                if float(draw) < self.layer_drop_p:
                    continue
            last_rows = rows if i == len(blocks) - 1 else None
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                # keep only the block's input; the backward recomputes it, replaying its dropout
                x = checkpoint(layer, x, padding_mask, seq_lens, last_rows, use_reentrant=False)
            else:
                x = layer(x, padding_mask, seq_lens, last_rows)
            if last_rows is None:
                hidden.append(x)
            else:
                rows = None  # applied
        if rows is not None:  # the last block was dropped (or none ran): select from its input
            x = x.reshape(-1, x.size(-1))[rows]
        return x, hidden


def build_context_network(cfg: ContextConfig) -> ContextNetwork:
    """Build the context network of ``cfg`` (BERT-style init of the blocks, as fairseq)."""
    layers = []
    for _ in range(cfg.num_layers):
        attention = SelfAttention(cfg.dim, cfg.num_heads, cfg.attention_dropout_p)
        ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.activation_dropout_p, cfg.dropout_p)
        layer = TransformerLayer(
            attention,
            ffn,
            dim=cfg.dim,
            dropout_p=cfg.dropout_p,
            layer_norm_first=cfg.layer_norm_first,
            eps=cfg.layer_norm_eps,
        )
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)
        layers.append(layer)
    return ContextNetwork(
        ConvPositionalEmbedding(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups),
        nn.ModuleList(layers),
        dim=cfg.dim,
        dropout_p=cfg.dropout_p,
        layer_norm_first=cfg.layer_norm_first,
        layer_drop_p=cfg.layer_drop_p,
        eps=cfg.layer_norm_eps,
        checkpoint_activations=cfg.checkpoint_activations,
    )
