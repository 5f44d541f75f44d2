"""Speed-only autograd kernels of the convolutional feature encoder.

Each computes what a plain torch op computes (``nn.Conv1d``, ``unfold``), in a form measured
faster on the CPU; :mod:`speechvq.models.kernels.feature_encoder` chooses between them. The numbers
behind each choice are in its docstring and docs/performance.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from speechvq.models.kernels.linear import matmul_nt


class PrecastKernelConv(torch.autograd.Function):
    """:func:`conv_time_major`'s bf16 oneDNN convolution of a ``[B, C, 1, S]`` channels-last
    image with a kernel prepared once for the batch (:meth:`~speechvq.models.kernels.feature_encoder.FastConvLayerBlock.precast_kernel`).

    On the CPU the encoder convolves one utterance at a time, and autocast would cast the fp32
    weight again for each: a layout copy and a cast per utterance and layer, and in the backward
    a gradient transposed back per utterance (4-5 ms of a SMALL bf16 step). Here the gradient of
    the channels-last fp32 kernel is each utterance's bf16 gradient cast to fp32, which autograd
    sums in fp32 before the one transposition: the values autocast's casts give.
    """

    @staticmethod
    def forward(
        ctx: Any, image: Tensor, weight: Tensor, kernel: Tensor, bias: Tensor | None, stride: int
    ) -> Tensor:
        """image: ``[B, C_in, 1, S]``; weight: the channels-last kernel (fp32 under autocast);
        kernel: its bf16 copy."""
        ctx.image_dtype, ctx.weight_dtype, ctx.stride = image.dtype, weight.dtype, stride
        ctx.has_bias = bias is not None
        image = image.to(kernel.dtype)
        ctx.save_for_backward(image, kernel)
        bias = bias.to(kernel.dtype) if bias is not None else None
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(image, kernel, bias, stride=(1, stride))  # (B, C_out, 1, S'), channels-last

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None]:
        image, kernel = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
        grad_image, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
            grad.to(kernel.dtype), image, kernel, [kernel.size(0)] if ctx.has_bias else None,
            [1, ctx.stride], [0, 0], [1, 1], False, [0, 0], 1, mask,
        )  # fmt: skip
        return (
            grad_image.to(ctx.image_dtype) if mask[0] else None,
            grad_kernel.to(ctx.weight_dtype) if mask[1] else None,  # channels-last, as the weight
            None,
            grad_bias.to(ctx.weight_dtype) if mask[2] else None,
            None,
        )


def fp32_on_cpu(x: Tensor) -> bool:
    """Whether this layer's convolution runs in fp32 on the CPU (fp32 input, no CPU autocast)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def bf16_on_cpu(x: Tensor) -> bool:
    """Whether this layer's convolution runs in bf16 on the CPU (bf16 input, or bf16 autocast)."""
    if x.device.type != "cpu":
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast_bf16


def conv_time_major(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, kernel: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``nn.Conv1d`` of a time-major ``[B, S, C]`` tensor without a layout copy: ``[B, S, C]`` is
    the memory of a channels-last ``[B, C, 1, S]`` image, which oneDNN convolves directly (as a
    ``1 x k`` conv2d) into a channels-last output, read back as ``[B, S', C_out]``. In bf16 on CPU
    its forward + backward beat the im2col matmul by 15-30% on the k = 3 layers (bench in
    docs/performance.md); the im2col matmul stays faster in fp32 and for the first layer.
    ``kernel``: the layer's :meth:`~speechvq.models.kernels.feature_encoder.FastConvLayerBlock.precast_kernel`, if the caller made it."""
    image = x.unsqueeze(1).permute(0, 3, 1, 2)  # (B, S, C) -> (B, C, 1, S), channels-last strides
    if kernel is not None:
        y = PrecastKernelConv.apply(image, *kernel, bias, stride)
    else:
        cl_weight = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (C_out, C_in, 1, k)
        y = F.conv2d(image, cl_weight, bias, stride=(1, stride))  # (B, C_out, 1, S'), channels-last
    return y.permute(0, 2, 3, 1).squeeze(1)  # (B, C_out, 1, S') -> (B, S', C_out)


class WindowBlocksConv(torch.autograd.Function):
    """A strided conv of one time-major utterance, ``[S, C]`` -> ``[S', C_out]``, as matmuls over
    views of the input, without an im2col copy, for kernels no longer than two strides.

    Viewed as rows of ``s * C`` values, the input holds window ``t``'s first ``min(k, s)`` frames
    in row ``t`` and its remaining ``k - s`` frames in row ``t + 1``; so the conv is
    ``A @ W_A^T + B @ W_B^T`` over two strided views (``B`` only when ``k > s``), and its backward
    is matmuls over the same views (:func:`matmul_nt`: oneDNN's in fp32 on x86). It skips the
    im2col matmul's column copy, scatter-add and zero fill.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight_a: Tensor,
        weight_b: Tensor | None,
        bias: Tensor | None,
        kernel: int,
        stride: int,
    ) -> Tensor:
        """x: ``[S, C]``; weight_a, weight_b: :meth:`~speechvq.models.kernels.feature_encoder.FastConvLayerBlock.window_weights`, the
        kernel-major weight's columns for the two views; bias: ``[C_out]``."""
        x = x.contiguous()
        frames = (x.size(0) - kernel) // stride + 1
        ctx.save_for_backward(x, weight_a, weight_b)
        ctx.kernel, ctx.stride, ctx.has_bias = kernel, stride, bias is not None
        views = window_blocks(x, frames, kernel, stride)
        y = matmul_nt(views[0], weight_a, bias)
        if weight_b is not None:
            y = matmul_nt(views[1], weight_b, add=y)
        return y  # (S', C_out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight_a, weight_b = ctx.saved_tensors
        kernel, stride = ctx.kernel, ctx.stride
        grad = grad.contiguous()
        frames = grad.size(0)
        views = window_blocks(x, frames, kernel, stride)
        weights = [weight_a] if weight_b is None else [weight_a, weight_b]
        grad_x = grad_bias = None
        grad_weights: list[Tensor | None] = [None, None]
        if ctx.needs_input_grad[0]:
            # k >= s: the first view tiles the first s * S' frames; k < s: the gaps between windows
            # get no gradient
            grad_x = torch.zeros_like(x)
            grad_views = window_blocks(grad_x, frames, kernel, stride)
            grad_views[0].copy_(matmul_nt(grad, weight_a.t()))
            if weight_b is not None:
                grad_views[1].add_(matmul_nt(grad, weight_b.t()))  # frames shared with the next window
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # (C_out, columns) = grad^T @ view: oneDNN copies a matmul's x to contiguous, so the
            # gradient is transposed once here, and the views are its weight
            grad_t = grad.t().contiguous()  # (C_out, S')
            for i, view in enumerate(views[: len(weights)]):
                if ctx.needs_input_grad[1 + i]:
                    grad_weights[i] = matmul_nt(grad_t, view.t())
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weights[0], grad_weights[1], grad_bias, None, None


def window_blocks(x: Tensor, frames: int, kernel: int, stride: int) -> list[Tensor]:
    """Strided views of contiguous ``[S, C]``: ``[frames, min(k, s)*C]`` holding each window's
    first ``min(k, s)`` frames, then (if ``k > s``) ``[frames, (k-s)*C]`` holding the rest."""
    channels = x.size(1)
    row = stride * channels
    first = min(kernel, stride) * channels
    views = [x.as_strided((frames, first), (row, 1), x.storage_offset())]
    if kernel > stride:
        views.append(x.as_strided((frames, (kernel - stride) * channels), (row, 1), x.storage_offset() + row))
    return views


class KernelMajorColumns(torch.autograd.Function):
    """im2col in kernel-major order: ``[B, S, C]`` -> ``[B, S', k*C]``, column ``j*C + c`` = input
    frame ``t*s + j``, channel ``c``.

    Kernel-major keeps the channel axis contiguous in both directions: the forward copy moves rows
    of C values, and the backward adds k strided views of the gradient into the input gradient,
    where autograd's ``unfold_backward`` (the channel-major layout) scatters element by element and
    took 14% of a SMALL step.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: int, stride: int) -> Tensor:
        batch, samples, channels = x.shape
        frames = (samples - kernel) // stride + 1
        ctx.shape, ctx.kernel, ctx.stride = x.shape, kernel, stride
        windows = x.unfold(1, kernel, stride)  # (B, S, C) -> (B, S', C, k)
        return windows.transpose(2, 3).reshape(batch, frames, kernel * channels)  # (B, S', k*C)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        batch, samples, channels = ctx.shape
        kernel, stride = ctx.kernel, ctx.stride
        frames = grad.size(1)
        grad_x = grad.new_zeros(batch, samples, channels)
        taps = grad.view(batch, frames, kernel, channels)
        for j in range(kernel):  # frame t, tap j reads input frame t*s + j
            grad_x[:, j : j + stride * (frames - 1) + 1 : stride] += taps[:, :, j]
        return grad_x, None, None
