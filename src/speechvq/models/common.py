"""Small helpers shared by the model components."""

from __future__ import annotations

import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

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


def _find_onednn_linear() -> Any:
    """oneDNN's matmul as a dense-tensor op (``X @ W^T + B``), or None where this torch lacks it."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_linear()
ONEDNN_FP32_LINEAR = _ONEDNN_LINEAR is not None
"""Whether :func:`linear` runs fp32 on x86 CPUs through oneDNN's matmul (True where available)."""


def _onednn_fp32(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight^T`` runs on oneDNN's fp32 matmul (see :func:`linear`)."""
    return (
        ONEDNN_FP32_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``; in fp32 on an x86 CPU through oneDNN's matmul, forward and backward.

    torch's fp32 ``mm`` on the CPU is MKL's, which on AMD CPUs runs its AVX2 code: on the 2-core
    Zen 5 CPU of docs/performance.md 200 GFLOP/s, against 350-450 GFLOP/s for oneDNN's AVX-512
    matmul, in all three products (forward, input and weight gradients). The result is fp32 with
    fp32 accumulation either way (the two differ in rounding only, ~1e-6 relative). bf16 and fp16
    already run on oneDNN, and autocast, other devices and dtypes take ``F.linear`` unchanged.
    In bf16 / fp16 on the CPU the product is checked once per shape by :mod:`lowp_guard`."""
    if _onednn_fp32(x, weight):
        return _OneDnnLinear.apply(x, weight, bias)
    if lowp_guard.low_precision_dtype(x) is not None:
        out_features, in_features = weight.shape
        shape = f"{in_features} -> {out_features}{'' if bias is not None else ', no bias'}"
        probe = [(64, in_features), (out_features, in_features)] + (
            [(out_features,)] if bias is not None else []
        )
        return lowp_guard.call("linear", shape, F.linear, [x, weight, bias], lowp_guard.randn_inputs(*probe))
    return F.linear(x, weight, bias)


def matmul_nt(x: Tensor, weight: Tensor, bias: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """``x @ weight^T (+ bias) (+ add)`` for 2-D ``x`` ``[N, K]`` and ``weight`` ``[M, K]``,
    ``add`` ``[N, M]``; no autograd, for the backward passes of custom functions. fp32 on x86 CPUs
    runs on oneDNN's matmul, as :func:`linear`.

    On oneDNN the operands' layouts matter: the op copies an ``x`` that is not contiguous (once
    per product), and takes a ``weight`` that is not dense (contiguous, or the transpose of a
    contiguous matrix) to its reference kernel, about 1000x slower, so such a weight is copied
    here first. Callers lay out their large operands as contiguous ``x`` or dense weights."""
    if _onednn_fp32(x, weight):
        if not (weight.is_contiguous() or weight.t().is_contiguous()):
            weight = weight.contiguous()
        if 1 not in x.stride():
            x = x.contiguous()
        if add is None:
            return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        return _ONEDNN_LINEAR.binary(x, add.contiguous(), weight, bias, "add")
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return y if add is None else y.add_(add)


class _OneDnnLinear(torch.autograd.Function):
    """``x @ weight^T + bias`` with oneDNN's matmul in every product (see :func:`linear`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.size(-1))  # (N, K)
        ctx.save_for_backward(rows, weight)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        return matmul_nt(rows, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        rows, weight = ctx.saved_tensors
        grad = grad.reshape(-1, weight.size(0)).contiguous()  # (N, M); dense: grad.t() is a weight below
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (N, M) @ (M, K)
            grad_x = matmul_nt(grad, weight.t()).view(ctx.shape)
        if ctx.needs_input_grad[1]:  # (M, N) @ (N, K)
            grad_weight = matmul_nt(grad.t(), rows.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """``nn.Linear`` through :func:`linear` (the same parameters and state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` (the same parameters and state dict) whose bf16 / fp16 convolution on the CPU
    is checked once per shape by :mod:`lowp_guard` (and runs in fp32 where it is wrong)."""

    def forward(self, x: Tensor) -> Tensor:
        if lowp_guard.low_precision_dtype(x) is None:
            return self._conv_forward(x, self.weight, self.bias)
        (kernel,), (stride,), (dilation,) = self.kernel_size, self.stride, self.dilation
        shape = (
            f"in {self.in_channels}, out {self.out_channels}, kernel {kernel}, stride {stride}, "
            f"dilation {dilation}, groups {self.groups}, padding {self.padding}"
        )
        frames = dilation * (kernel - 1) + stride * 49 + 1  # 50 output frames without padding
        probe = [(2, self.in_channels, frames), tuple(self.weight.shape)]
        probe += [(self.out_channels,)] if self.bias is not None else []
        return lowp_guard.call(
            "conv1d", shape, self._conv, [x, self.weight, self.bias], lowp_guard.randn_inputs(*probe)
        )

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self._conv_forward(x, weight, bias)


if _ONEDNN_LINEAR is not None:
    # torch.utils.flop_counter knows mm and addmm but not oneDNN's op: count it as the matmul it is

    @register_flop_formula(_ONEDNN_LINEAR)
    def _onednn_linear_flop(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        """Both overloads, ``(X, W, ...)`` and ``.binary`` ``(X, other, W, ...)``: 2 N K M."""
        flops = 2 * out_shape[-1]
        for d in x_shape:
            flops *= int(d)
        return flops


_DRAWS = 2**31
"""Values of each int32 half of a :func:`dropout` draw: uniform over [0, 2^31)."""

_HALVES_31_BITS = 0x7FFFFFFF7FFFFFFF
"""Clears bit 31 of an int64 draw (bit 63 is already 0), leaving two uniform 31-bit halves."""


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, distributed as ``F.dropout``: each element is kept with probability
    1 - p and scaled by 1 / (1 - p).

    On the CPU the keep mask comes from int64 ``random_()`` draws, uniform over [0, 2^63), each
    split into two int32 halves of 31 random bits (bit 31 cleared): an element is kept where its
    half is at least ``round(p * 2^31)`` (the keep probability is exact to 2^-32), and the mask is
    applied by one multiply. Forward + backward 1.3-1.6x faster than ``F.dropout``, whose
    ``bernoulli_`` draws were 9% of a SMALL training step. torch's CPU generator is serial, and an
    int64 draw costs 1.2x an int32 one for twice the bits: the draws for a ``[706, 768]`` mask
    take 0.9 ms against 1.5 ms as int32. Elsewhere (CUDA's fused kernel) it is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    n = x.numel()
    draws = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_()  # [0, 2^63)
    halves = draws.bitwise_and_(_HALVES_31_BITS).view(torch.int32)[:n]  # 2 per draw, [0, 2^31)
    keep = (halves >= round(p * _DRAWS)).view(x.shape)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (the same distribution, faster on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
