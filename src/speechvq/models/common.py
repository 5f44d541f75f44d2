"""Small helpers shared by the model components."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from speechvq.models.kernels import lowp_guard


def lengths_to_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Padding mask from lengths.

    Args:
        lengths: ``[B]`` valid lengths.
        max_len: T, the padded length.

    Returns:
        ``[B, T]`` bool, True at padded positions.
    """
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] >= lengths[:, None]


def padding_mask_or_none(lengths: Tensor, max_len: int) -> Tensor | None:
    """:func:`lengths_to_padding_mask`, or None when every length is ``max_len`` (no padding), as
    the models pass it on: no mask to apply, and a batch without padding keeps the padded layout."""
    if bool((lengths < max_len).any()):
        return lengths_to_padding_mask(lengths, max_len)
    return None


class GradMultiply(torch.autograd.Function):
    """Identity in the forward pass; scales the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class Linear(nn.Linear):
    """``nn.Linear`` whose bf16 / fp16 product on the CPU is checked once per shape by
    :mod:`~speechvq.models.kernels.lowp_guard` (and runs in fp32 where it is wrong).

    :attr:`linear` is the layer's op, ``F.linear`` here; the fast kernels' subclass swaps in its
    own (:mod:`speechvq.models.kernels`). Modules that multiply by weights derived from a layer's
    own (concatenated, cast) call it through the layer, so the choice is made once."""

    linear = staticmethod(lowp_guard.linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x, self.weight, self.bias)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` whose bf16 / fp16 convolution on the CPU is checked once per shape by
    :mod:`~speechvq.models.kernels.lowp_guard` (and runs in fp32 where it is wrong)."""

    def forward(self, x: Tensor) -> Tensor:
        return lowp_guard.conv1d(self, x)


class Dropout(nn.Dropout):
    """``nn.Dropout``, in the modules whose dropout the fast kernels may draw faster
    (:mod:`speechvq.models.kernels`); it marks them, and changes nothing."""
