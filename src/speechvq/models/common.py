"""Small helpers shared by the model components."""

from __future__ import annotations

import torch
from torch import Tensor


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


class GradMultiply(torch.autograd.Function):
    """Identity in the forward pass; scales the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None
