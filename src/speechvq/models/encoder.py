"""Raw-waveform convolutional feature encoder (wav2vec 2.0 paper section 2)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from speechvq.config import FeatureEncoderConfig
from speechvq.models import lowp_guard
from speechvq.models.common import GradMultiply, linear, matmul_nt


def conv_output_lengths(lengths: Tensor, conv_layers: tuple[tuple[int, int, int], ...]) -> Tensor:
    """Frames produced by the conv stack: floor((L - k) / s) + 1 per layer, clamped at 0.

    Args:
        lengths: ``[B]`` input lengths in samples.
        conv_layers: (channels, kernel, stride) per layer.

    Returns:
        ``[B]`` output lengths in frames (int64).
    """
    out = lengths.to(torch.long)
    for _, kernel, stride in conv_layers:
        out = torch.div(out - kernel, stride, rounding_mode="floor") + 1
        out = out.clamp(min=0)
    return out


def receptive_field(conv_layers: tuple[tuple[int, int, int], ...]) -> int:
    """Samples that the first frame of the conv stack depends on (the minimum input length)."""
    field, jump = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


def check_waveforms(waveforms: Tensor, lengths: Tensor | None, min_samples: int) -> Tensor:
    """Validate a ``[B, S]`` batch and return its ``[B]`` lengths (all S when None).

    Raises:
        ValueError: if ``waveforms`` is not 2-D, or an utterance is shorter than ``min_samples``.
    """
    if waveforms.ndim != 2:
        raise ValueError(
            f"`waveforms` must be 2-D [batch, samples], but has shape {tuple(waveforms.shape)} instead."
        )
    batch, num_samples = waveforms.shape
    if lengths is None:
        lengths = torch.full((batch,), num_samples, dtype=torch.long, device=waveforms.device)
    if batch and int(lengths.min()) < min_samples:
        raise ValueError(
            f"every input must hold at least {min_samples} samples (one frame), "
            f"but the shortest holds {int(lengths.min())} instead."
        )
    return lengths


class MaskedGroupNorm(nn.Module):
    """GroupNorm with one group per channel whose statistics skip padded frames.

    Without padding it equals ``nn.GroupNorm(C, C)`` (the BASE model's first-layer norm); with
    padding each utterance is normalised over its own frames only, so a padded batch gives the
    same result per utterance as each utterance alone. Statistics are computed in fp32 whatever
    the input dtype; the normalisation itself is one fused multiply-add in the input dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """x: ``[B, T, C]``; lengths: ``[B]`` frames or None."""
        batch = x.size(0)
        if lengths is None:
            var, mean = torch.var_mean(x.float(), dim=1, unbiased=False, keepdim=True)  # (B, 1, C)
        else:
            # per utterance over its valid frames; B is small, the reductions are the cost
            stats = [
                torch.var_mean(x[b, : int(lengths[b])].float(), dim=0, unbiased=False) for b in range(batch)
            ]
            var = torch.stack([v for v, _ in stats])[:, None, :]
            mean = torch.stack([m for _, m in stats])[:, None, :]
        scale, shift = self.scale_shift(var, mean)
        return _ChannelAffine.apply(x, scale.to(x.dtype), shift.to(x.dtype))

    def scale_shift(self, var: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """The normalisation as ``x * scale + shift``: fp32 ``[B, 1, C]`` each, from the fp32
        statistics."""
        scale = torch.rsqrt(var + self.eps) * self.weight.float()
        return scale, self.bias.float() - mean * scale


class _ChannelAffine(torch.autograd.Function):
    """``x * scale + shift`` for ``x`` ``[B, T, C]`` and per-utterance ``scale``, ``shift`` ``[B, 1, C]``:
    ``torch.addcmul`` with a leaner backward.

    Autograd's addcmul backward multiplies the whole input by its ``value`` (1) before the product
    with the gradient, one extra pass over the largest activation of the encoder (forward +
    backward on one 4 s utterance in bf16: 8.3 ms with it, 3.6 ms here). The gradients here are
    the same values: ``grad * scale``, ``sum_t(grad * x)`` and ``sum_t(grad)``, in the input's
    dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        return torch.addcmul(shift, x, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, scale = ctx.saved_tensors
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = (grad * x).sum(dim=1, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_shift = grad.sum(dim=1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_shift


_FEW_COLUMNS = 64
"""A conv layer with at most this many input columns (k * C_in; the first layer has 10 x 1) runs as
a batched matmul, and its GroupNorm statistics come from the moments of its input columns."""


def linear_output_moments(
    cols: Tensor, weight: Tensor, bias: Tensor | None, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-utterance, per-channel variance and mean over time of ``cols @ weight.T + bias``,
    computed from the input's moments, without the output.

    For ``y_t = W x_t + b``: ``mean(y) = W mean(x) + b`` and ``var(y_c) = w_c^T Cov(x) w_c``.
    The first conv layer maps 10 samples to 512 (BASE) channels, so the 10 x 10 covariance of the
    windows is ~50x cheaper than the statistics of the output and its backward (8% of a SMALL
    step), and exact in fp32 whatever precision the layer's matmul ran in.

    Args:
        cols: ``[B, T, J]`` layer input columns.
        weight: ``[C, J]``; bias: ``[C]`` or None.
        lengths: ``[B]`` valid frames, or None for all T.

    Returns:
        (var, mean), fp32, each ``[B, 1, C]`` (biased variance, as GroupNorm).
    """
    with torch.autocast(device_type=cols.device.type, enabled=False):
        rows = (
            [cols] if lengths is None else [cols[b : b + 1, : int(lengths[b])] for b in range(cols.size(0))]
        )
        means, covs = [], []
        for r in rows:  # (b, n, J), b = B without padding, 1 per utterance with it
            r = r.float()
            mu = r.mean(dim=1, keepdim=True)  # (b, 1, J)
            centred = r - mu
            covs.append(centred.transpose(1, 2) @ centred / r.size(1))  # (b, J, J)
            means.append(mu)
        mu, cov = torch.cat(means), torch.cat(covs)
        w = weight.float().t()  # (J, C)
        mean = mu @ w  # (B, 1, J) @ (J, C) -> (B, 1, C)
        if bias is not None:
            mean = mean + bias.float()
        var = ((cov @ w) * w).sum(dim=1, keepdim=True).clamp(min=0.0)  # (B, J, C) -> (B, 1, C)
    return var, mean


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, T, C]`` tensor (the LARGE model's conv norm)."""

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class ConvLayerBlock(nn.Module):
    """Conv1d -> optional norm -> GELU on ``[B, T, C]`` features, propagating lengths.

    Activations stay time-major (``[B, T, C]``), so there are no layout transposes between layers.
    The convolution (the same result as ``nn.Conv1d`` to rounding) runs as whichever form measured
    fastest on this layer's shape and precision: a matrix product over unfolded frames (im2col,
    one matmul with fp32 accumulation, whose backward is also a matmul) for the first layer and
    off the CPU; for the other layers on the CPU, oneDNN's channels-last convolution in bf16 and,
    in fp32, matmuls over strided views of one utterance (:class:`_WindowBlocksConv`, no im2col
    copy). The first layer's GroupNorm statistics come from the moments of its input windows
    (:func:`linear_output_moments`). ``conv`` only holds the parameters (``conv.weight`` is
    ``[C_out, C_in, k]``, as in fairseq and transformers).
    """

    def __init__(self, conv: nn.Conv1d, norm: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.kernel = int(conv.kernel_size[0])
        self.stride = int(conv.stride[0])
        # at most _FEW_COLUMNS input columns (the first layer): a batched matmul, GroupNorm folded in
        self.few_columns = self.kernel * conv.in_channels <= _FEW_COLUMNS

    def forward(
        self, x: Tensor, lengths: Tensor | None, kernel: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x: ``[B, S, C_in]`` -> ``[B, S', C_out]``; lengths in and out in steps of this layer.
        ``kernel``: this layer's weight prepared once by a caller that convolves several
        utterances one at a time on the CPU: :meth:`precast_kernel` in bf16,
        :meth:`window_weights` in fp32."""
        if lengths is not None:
            lengths = conv_output_lengths(lengths, ((0, self.kernel, self.stride),))
        if not self.few_columns and _bf16_on_cpu(x):
            how = self.low_precision_mode("conv_time_major")
            if how == lowp_guard.NATIVE:
                x = _conv_time_major(x, self.conv.weight, self.conv.bias, self.stride, kernel)
            else:
                x = lowp_guard.island(
                    how, torch.bfloat16, self._time_major, [x, self.conv.weight, self.conv.bias]
                )
            return F.gelu(self.norm(x, lengths) if self.norm is not None else x), lengths
        if x.size(0) == 1 and _fp32_on_cpu(x) and self.runs_window_blocks():
            # one utterance on the CPU (ConvFeatureEncoder's CPU path), fp32: no im2col copy
            blocks = kernel if kernel is not None else self.window_weights()
            x = _WindowBlocksConv.apply(x.squeeze(0), *blocks, self.conv.bias, self.kernel, self.stride)[None]
            return F.gelu(self.norm(x, lengths) if self.norm is not None else x), lengths
        # (C_out, C_in, k) -> (C_out, k, C_in) -> (C_out, k*C_in), the columns' kernel-major order
        weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)
        cols = _KernelMajorColumns.apply(x, self.kernel, self.stride)  # (B, S, C) -> (B, S', k*C)
        if self.few_columns and isinstance(self.norm, MaskedGroupNorm):
            # GroupNorm folded into the matmul: y = (W x + b) * scale + shift = (W * scale) x +
            # (b * scale + shift), with the statistics from the window moments. No pass over the
            # layer's output (the largest activation of the encoder) but the GELU; forward +
            # backward of one 4 s utterance: 19.4 -> 13.6 ms SMALL, 41 -> 18 ms BASE in bf16,
            # 65 -> 38 ms BASE in fp32 (docs/performance.md). In bf16 it is also nearer fp32:
            # the norm's scale is applied in fp32 before the one rounding to bf16.
            var, mean = linear_output_moments(cols, weight, self.conv.bias, lengths)
            scale, shift = self.norm.scale_shift(var, mean)  # fp32 (B, 1, C)
            if self.conv.bias is not None:
                shift = shift + self.conv.bias.float() * scale
            folded = weight.float().t()[None] * scale  # (B, k*C_in, C_out): one weight per utterance
            inputs = [shift.to(cols.dtype), cols, folded.to(cols.dtype)]
            x = self._guarded_matmul("baddbmm", torch.baddbmm, inputs, [(2, 1), (2, 64), (2, cols.size(-1))])
            return F.gelu(x), lengths
        if self.few_columns:
            # [B, S', k] @ [k, C] per utterance: autograd's weight gradient is then a bmm + sum,
            # 2.5-3x faster than the [C, B*S'] @ [B*S', k] mm it derives from F.linear (bench in
            # docs/performance.md)
            inputs = [cols, weight.t().expand(cols.size(0), -1, -1)]
            x = self._guarded_matmul("bmm", torch.bmm, inputs, [(2, 64), (2, cols.size(-1))])
            if self.conv.bias is not None:
                x = x + self.conv.bias.to(x.dtype)
        else:
            x = linear(cols, weight, self.conv.bias)
        if self.norm is not None:
            x = self.norm(x, lengths)
        return F.gelu(x), lengths

    def low_precision_mode(self, op: str) -> str:
        """How this layer's bf16 time-major conv runs on this CPU (:mod:`lowp_guard`)."""
        conv = self.conv
        shape = f"in {conv.in_channels}, out {conv.out_channels}, kernel {self.kernel}, stride {self.stride}"
        samples = self.kernel + self.stride * 63  # 64 output frames
        probe = [(1, samples, conv.in_channels), tuple(conv.weight.shape)]
        probe += [(conv.out_channels,)] if conv.bias is not None else []
        return lowp_guard.mode(op, shape, torch.bfloat16, self._time_major, lowp_guard.randn_inputs(*probe))

    def _time_major(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """:func:`_conv_time_major` of ``[B, S, C_in]``, in the inputs' dtype."""
        return _conv_time_major(x, weight, bias, self.stride)

    def _guarded_matmul(self, op: str, fn: Any, inputs: list[Tensor], rows: list[tuple[int, int]]) -> Tensor:
        """The first layer's batched matmul ``fn(*inputs)``, checked by :mod:`lowp_guard` in
        bf16 / fp16 on the CPU; ``rows``: the probe's leading dims of each input."""
        if lowp_guard.low_precision_dtype(inputs[0]) is None:
            return fn(*inputs)
        columns, channels = inputs[-1].shape[-2:]
        probe = [
            (*lead, size) for lead, size in zip(rows, [channels] * (len(inputs) - 2) + [columns, channels])
        ]
        shape = f"[T, {columns}] @ [{columns}, {channels}]"
        return lowp_guard.call(op, shape, fn, inputs, lowp_guard.randn_inputs(*probe))

    def runs_window_blocks(self) -> bool:
        """Whether an fp32 utterance on the CPU runs through :class:`_WindowBlocksConv` (every layer
        but the first, whose windows span at most two strides)."""
        return not self.few_columns and self.kernel <= 2 * self.stride

    def window_weights(self) -> tuple[Tensor, Tensor | None]:
        """:class:`_WindowBlocksConv`'s two weight blocks, differentiable: the kernel-major
        ``[C_out, k*C_in]`` weight's first ``min(k, s) * C_in`` columns and the rest (None when
        ``k <= s``), each contiguous. oneDNN copies a weight that is not dense for every product,
        so a caller that convolves several utterances makes these once for all of them."""
        # (C_out, C_in, k) -> (C_out, k, C_in) -> (C_out, k*C_in), the columns' kernel-major order
        weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)
        if self.kernel <= self.stride:
            return weight, None
        split = self.stride * self.conv.in_channels  # min(k, s) = s here
        return weight[:, :split].contiguous(), weight[:, split:].contiguous()

    def precast_kernel(self) -> tuple[Tensor, Tensor] | None:
        """The weight as the channels-last ``[C_out, C_in, 1, k]`` kernel that oneDNN convolves
        with on the CPU, for :class:`_PrecastKernelConv`: in the weight's dtype (differentiable:
        the utterances' gradients are summed in this layout, then transposed back once) and in
        bf16 (detached). None for a layer that runs as a matmul (the first)."""
        if self.few_columns:
            return None
        kernel = self.conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        return kernel, kernel.detach().to(torch.bfloat16)


class _PrecastKernelConv(torch.autograd.Function):
    """:func:`_conv_time_major`'s bf16 oneDNN convolution of a ``[B, C, 1, S]`` channels-last
    image with a kernel prepared once for the batch (:meth:`ConvLayerBlock.precast_kernel`).

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


def _fp32_on_cpu(x: Tensor) -> bool:
    """Whether this layer's convolution runs in fp32 on the CPU (fp32 input, no CPU autocast)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _bf16_on_cpu(x: Tensor) -> bool:
    """Whether this layer's convolution runs in bf16 on the CPU (bf16 input, or bf16 autocast)."""
    if x.device.type != "cpu":
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast_bf16


def _conv_time_major(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, kernel: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``nn.Conv1d`` of a time-major ``[B, S, C]`` tensor without a layout copy: ``[B, S, C]`` is
    the memory of a channels-last ``[B, C, 1, S]`` image, which oneDNN convolves directly (as a
    ``1 x k`` conv2d) into a channels-last output, read back as ``[B, S', C_out]``. In bf16 on CPU
    its forward + backward beat the im2col matmul by 15-30% on the k = 3 layers (bench in
    docs/performance.md); the im2col matmul stays faster in fp32 and for the first layer.
    ``kernel``: the layer's :meth:`ConvLayerBlock.precast_kernel`, if the caller made it."""
    image = x.unsqueeze(1).permute(0, 3, 1, 2)  # (B, S, C) -> (B, C, 1, S), channels-last strides
    if kernel is not None:
        y = _PrecastKernelConv.apply(image, *kernel, bias, stride)
    else:
        cl_weight = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (C_out, C_in, 1, k)
        y = F.conv2d(image, cl_weight, bias, stride=(1, stride))  # (B, C_out, 1, S'), channels-last
    return y.permute(0, 2, 3, 1).squeeze(1)  # (B, C_out, 1, S') -> (B, S', C_out)


class _WindowBlocksConv(torch.autograd.Function):
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
        """x: ``[S, C]``; weight_a, weight_b: :meth:`ConvLayerBlock.window_weights`, the
        kernel-major weight's columns for the two views; bias: ``[C_out]``."""
        x = x.contiguous()
        frames = (x.size(0) - kernel) // stride + 1
        ctx.save_for_backward(x, weight_a, weight_b)
        ctx.kernel, ctx.stride, ctx.has_bias = kernel, stride, bias is not None
        views = _window_blocks(x, frames, kernel, stride)
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
        views = _window_blocks(x, frames, kernel, stride)
        weights = [weight_a] if weight_b is None else [weight_a, weight_b]
        grad_x = grad_bias = None
        grad_weights: list[Tensor | None] = [None, None]
        if ctx.needs_input_grad[0]:
            # k >= s: the first view tiles the first s * S' frames; k < s: the gaps between windows
            # get no gradient
            grad_x = torch.zeros_like(x)
            grad_views = _window_blocks(grad_x, frames, kernel, stride)
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


def _window_blocks(x: Tensor, frames: int, kernel: int, stride: int) -> list[Tensor]:
    """Strided views of contiguous ``[S, C]``: ``[frames, min(k, s)*C]`` holding each window's
    first ``min(k, s)`` frames, then (if ``k > s``) ``[frames, (k-s)*C]`` holding the rest."""
    channels = x.size(1)
    row = stride * channels
    first = min(kernel, stride) * channels
    views = [x.as_strided((frames, first), (row, 1), x.storage_offset())]
    if kernel > stride:
        views.append(x.as_strided((frames, (kernel - stride) * channels), (row, 1), x.storage_offset() + row))
    return views


class _KernelMajorColumns(torch.autograd.Function):
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


class ConvFeatureEncoder(nn.Module):
    """Stack of :class:`ConvLayerBlock`, raw waveform to frame features.

    Build it with :func:`build_feature_encoder`.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        conv_layers: tuple[tuple[int, int, int], ...],
        grad_mult: float,
        checkpoint_activations: bool = False,
    ):
        super().__init__()
        self.layers = layers
        self.conv_layers = conv_layers
        self.grad_mult = grad_mult
        self.checkpoint_activations = checkpoint_activations

    @property
    def receptive_field(self) -> int:
        """Samples that the first frame depends on (the minimum input length)."""
        return receptive_field(self.conv_layers)

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive output frames (product of the strides)."""
        return math.prod(s for _, _, s in self.conv_layers)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``[B]`` samples -> ``[B]`` frames (see :func:`conv_output_lengths`)."""
        return conv_output_lengths(lengths, self.conv_layers)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode waveforms.

        Args:
            waveforms: ``[B, S]`` float samples.
            lengths: ``[B]`` valid samples per utterance; None means all are S long.

        Returns:
            features ``[B, T, C]`` and their valid lengths ``[B]`` in frames.

        Raises:
            ValueError: if ``waveforms`` is not 2-D, or an utterance is shorter than one frame.
        """
        lengths = check_waveforms(waveforms, lengths, self.receptive_field)
        batch, samples = waveforms.shape
        with torch.no_grad() if self.grad_mult == 0.0 else contextlib.nullcontext():
            if waveforms.device.type == "cpu" and batch > 1:
                # One utterance at a time: no padding is convolved (11% of the conv FLOPs on the
                # benchmark's batch), and batch-1 convolutions run faster here even without
                # padding (+10% bf16, +17% fp32 per SMALL step on 4 x 4 s). The valid frames are
                # the batched call's (each depends on valid samples only, and the norms are per
                # utterance); padded frames are zeros. Off the CPU the batched call stays (one
                # launch per layer; no GPU has been available to time the per-utterance form).
                frames = int(self.output_lengths(torch.tensor([samples]))[0])
                # each layer's weight laid out once for all utterances: bf16 cast (_PrecastKernelConv)
                # or fp32 window blocks (_WindowBlocksConv)
                kernels = None
                if _bf16_on_cpu(waveforms):
                    kernels = [layer.precast_kernel() for layer in self.layers]
                elif _fp32_on_cpu(waveforms):
                    kernels = [
                        layer.window_weights() if layer.runs_window_blocks() else None
                        for layer in self.layers
                    ]
                parts = [
                    self._layers(waveforms[b : b + 1, :n, None], None, kernels)[0][0]
                    for b, n in enumerate(lengths.tolist())
                ]
                x = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)  # (B, max n, C)
                x = F.pad(x, (0, 0, 0, frames - x.size(1)))  # (B, T, C)
                frame_lengths = self.output_lengths(lengths)
            else:
                x, frame_lengths = self._layers(waveforms[:, :, None], lengths)  # (B, S) -> (B, S, 1)
        if self.grad_mult not in (0.0, 1.0):
            x = GradMultiply.apply(x, self.grad_mult)
        return x, frame_lengths

    def _layers(
        self,
        x: Tensor,
        lengths: Tensor | None,
        kernels: list[tuple[Tensor, Tensor | None] | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the conv layers on ``[B, S, 1]``; lengths in samples -> frames (None: all valid);
        ``kernels``: each layer's weight prepared for the batch (:meth:`ConvLayerBlock.forward`'s
        ``kernel``), or None."""
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        frame_lengths = lengths
        for i, layer in enumerate(self.layers):
            kernel = kernels[i] if kernels is not None else None
            if recompute:  # keep only the layer's input; recompute the rest in the backward
                x, frame_lengths = checkpoint(layer, x, frame_lengths, kernel, use_reentrant=False)
            else:
                x, frame_lengths = layer(x, frame_lengths, kernel)
        if frame_lengths is None:
            frame_lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
        return x, frame_lengths


def min_input_samples(cfg: FeatureEncoderConfig) -> int:
    """Samples the front end of ``cfg`` needs for one frame (shorter input is an error in ``forward``)."""
    if cfg.kind == "fbank":
        from speechvq.models.fbank import FbankFeatureEncoder

        return FbankFeatureEncoder(num_mels=cfg.num_mels, stack=cfg.fbank_stack).receptive_field
    return receptive_field(cfg.conv_layers)


def build_feature_encoder(cfg: FeatureEncoderConfig) -> ConvFeatureEncoder:
    """Build the feature encoder of ``cfg``: the CNN, or the log-mel front end for ``kind: fbank``."""
    if cfg.kind == "fbank":
        from speechvq.models.fbank import FbankFeatureEncoder

        return FbankFeatureEncoder(num_mels=cfg.num_mels, stack=cfg.fbank_stack)  # type: ignore[return-value]
    layers = []
    in_channels = 1
    for i, (channels, kernel, stride) in enumerate(cfg.conv_layers):
        conv = nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=cfg.conv_bias)
        nn.init.kaiming_normal_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        norm: nn.Module | None
        if cfg.norm_mode == "layer_norm":
            norm = ChannelLayerNorm(channels)
        elif i == 0:
            norm = MaskedGroupNorm(channels)
        else:
            norm = None
        layers.append(ConvLayerBlock(conv, norm))
        in_channels = channels
    return ConvFeatureEncoder(
        nn.ModuleList(layers), cfg.conv_layers, cfg.grad_mult, cfg.checkpoint_activations
    )
