"""Speed-only autograd kernel of the context network's grouped positional convolution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class GroupedConvFlippedBackward(torch.autograd.Function):
    """``F.conv1d(x, weight, bias, padding=p, groups=g)`` whose input gradient is computed as a
    forward convolution of the output gradient with the flipped, transposed kernel.

    oneDNN's grouped backward-data kernel runs at half its forward rate on the positional conv's
    shapes (2 threads: 56 against 39 ms for BASE in bf16, 7.2 against 4.1 ms for SMALL; bench in
    docs/performance.md); the forward formulation computes the same sums. The weight gradient is
    still oneDNN's backward-weights.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, groups: int
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups, ctx.has_bias = padding, groups, bias is not None
        return F.conv1d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        padding, groups = ctx.padding, ctx.groups
        out_channels, in_per_group, kernel = weight.shape
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # x[s] reached output t = s + p - j through tap j: correlate the gradient with the
            # kernel flipped in time and transposed within each group, padded k - 1 - p
            flipped = (
                weight.view(groups, out_channels // groups, in_per_group, kernel)
                .transpose(1, 2)
                .flip(-1)
                .reshape(groups * in_per_group, out_channels // groups, kernel)
            )
            grad_x = F.conv1d(grad, flipped, padding=kernel - 1 - padding, groups=groups)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1], [padding], [1], False, [0], groups, [False, True, False]
            )[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_x, grad_weight, grad_bias, None, None
