"""Transformer context network with a convolutional positional embedding (paper section 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from speechvq.config import ContextConfig
from speechvq.models import kernels
from speechvq.models.common import Conv1d, Dropout, Linear
from speechvq.models.kernels import lowp_guard


class ConvPositionalEmbedding(nn.Module):
    """Grouped conv over time with weight norm (dim=2), "same" padding, then GELU.

    The weight is stored as weight-norm magnitude/direction parametrizations, as transformers does.
    """

    def __init__(self, dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        conv = Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove_last = kernel_size % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        y = self.conv(x.transpose(1, 2))  # (B, T, D) -> (B, D, T) -> (B, D, T')
        if self.remove_last:
            y = y[:, :, :-1]  # an even kernel yields T + 1 frames
        return F.gelu(y).transpose(1, 2)  # (B, D, T) -> (B, T, D)


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
        self, x: Tensor, key_padding_mask: Tensor | None = None, rows: Tensor | None = None
    ) -> Tensor:
        """Attend within each utterance.

        Args:
            x: ``[B, T, D]``.
            key_padding_mask: ``[B, T]`` True at padding.
            rows: ``[R]`` flat frame indices into ``x.reshape(-1, D)``; if given, the output is
                ``[R, D]``, projected at those frames only.
        """
        batch, frames, dim = x.shape
        heads = self.num_heads
        # one matmul for q, k and v (the three projections stay separate modules for checkpoints)
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = self.q_proj.linear(x, weight, bias).view(batch, frames, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, T, 3, H, D/H) -> 3 x (B, H, T, D/H)
        y = self._attend(q, k, v, key_padding_mask)
        y = y.transpose(1, 2).reshape(batch, frames, dim)  # (B, H, T, D/H) -> (B, T, D)
        if rows is not None:
            y = y.reshape(-1, dim)[rows]
        return self.out_proj(y)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """``[B, H, T, D/H]`` q, k, v -> attention output of the same shape, through
        ``scaled_dot_product_attention`` (checked by :mod:`lowp_guard` in bf16 / fp16 on the CPU)."""
        dropout_p = self.dropout_p if self.training else 0.0
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T), True = attend

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)

        heads, head_dim = q.size(-3), q.size(-1)
        return lowp_guard.call_checked(
            "attention",
            f"heads {heads}, head dim {head_dim}, sdpa",
            attend,
            [q, k, v],
            F.scaled_dot_product_attention,  # the probe: the same kernel without mask and dropout
            lambda g: [torch.randn(heads, 48, head_dim, generator=g) for _ in range(3)],
        )


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
        self, x: Tensor, key_padding_mask: Tensor | None = None, rows: Tensor | None = None
    ) -> Tensor:
        """``[B, T, D]`` -> ``[B, T, D]``; ``key_padding_mask`` goes to the attention as it is (the
        fast attention also takes a packed layout there). With ``rows`` (flat frame indices into
        ``x.reshape(-1, D)``) the output is ``[R, D]``: every frame is attended to, but the queries'
        outputs, the feed-forward and the norms are computed at those frames only."""
        residual = x if rows is None else x.reshape(-1, x.size(-1))[rows]
        if self.layer_norm_first:
            attended = self.attention(self.attention_norm(x), key_padding_mask, rows)
            x = residual + self.dropout(attended)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(residual + self.dropout(self.attention(x, key_padding_mask, rows)))
        return self.ffn_norm(x + self.feed_forward(x))


@dataclass
class ContextOutput:
    """Output of :class:`ContextNetwork`."""

    last_hidden_state: Tensor
    """``[B, T, D]`` final output (after the final LayerNorm for pre-LN models); ``[R, D]``, the
    selected frames in row-major order, when the network ran with ``output_frames``."""
    hidden_states: Sequence[Tensor]
    """Input of the first block, then the output of each block that ran, each ``[B, T, D]``.
    Where the fast kernels ran the blocks packed (CPU, padded batch), each is unpacked when read,
    with zeros at padding. With ``output_frames`` the last block's output is left out (it exists at the
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
            ValueError: if ``output_frames`` marks a padded frame (or, with the fast kernels,
                ``padding_mask`` is not a suffix of each row).
        """
        if (
            output_frames is not None
            and padding_mask is not None
            and bool((output_frames & padding_mask).any())
        ):
            raise ValueError("`output_frames` must mark valid frames only, but marks padding.")
        x = self._embed(x, padding_mask)
        rows = None if output_frames is None else output_frames.reshape(-1).nonzero().squeeze(1)
        x, hidden = self._run_blocks(x, padding_mask, rows, num_layers, layer_drop_generator)
        if self.layer_norm_first and num_layers is None:
            x = self.layer_norm(x)
        return ContextOutput(last_hidden_state=x, hidden_states=tuple(hidden))

    def _embed(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The blocks' input ``[B, T, D]``: padding zeroed, the positional conv added, then
        (post-LN) the LayerNorm and the dropout."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def _run_blocks(
        self,
        x: Tensor,
        padding_mask: Any,
        rows: Tensor | None,
        num_layers: int | None,
        layer_drop_generator: torch.Generator | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """The first ``num_layers`` blocks (all if None) with LayerDrop: (the last output, the
        input and each output that ran). With ``rows`` the last block's output is ``[R, D]`` at
        those frames (and left out of the list); if it was dropped, they are read off its input.
        ``padding_mask`` goes to each block as it is (a padding mask, None, or the fast kernels'
        packed layout)."""
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
                x = checkpoint(layer, x, padding_mask, last_rows, use_reentrant=False)
            else:
                x = layer(x, padding_mask, last_rows)
            if last_rows is None:
                hidden.append(x)
            else:
                rows = None  # applied
        if rows is not None:  # the last block was dropped (or none ran): select from its input
            x = x.reshape(-1, x.size(-1))[rows]
        return x, hidden


def build_context_network(cfg: ContextConfig, *, fast: bool = True) -> ContextNetwork:
    """Build the context network of ``cfg`` (BERT-style init of the blocks, as fairseq); ``fast``
    selects the fast kernels (:mod:`speechvq.models.kernels`), else plain PyTorch."""
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
    network = ContextNetwork(
        ConvPositionalEmbedding(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups),
        nn.ModuleList(layers),
        dim=cfg.dim,
        dropout_p=cfg.dropout_p,
        layer_norm_first=cfg.layer_norm_first,
        layer_drop_p=cfg.layer_drop_p,
        eps=cfg.layer_norm_eps,
        checkpoint_activations=cfg.checkpoint_activations,
    )
    return kernels.select_(network, fast=fast)
