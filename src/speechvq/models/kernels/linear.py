"""Fast fp32 linear layers on x86 CPUs: oneDNN's matmul in the forward and both gradients."""

from __future__ import annotations

import platform
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from speechvq.models.common import Linear
from speechvq.models.kernels import lowp_guard


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
    already run on oneDNN, and autocast, other devices and dtypes take
    :func:`~speechvq.models.kernels.lowp_guard.linear` (``F.linear``, checked in bf16 / fp16)."""
    if _onednn_fp32(x, weight):
        return _OneDnnLinear.apply(x, weight, bias)
    return lowp_guard.linear(x, weight, bias)


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


class FastLinear(Linear):
    """:class:`~speechvq.models.common.Linear` through :func:`linear` (the same parameters and
    state dict)."""

    linear = staticmethod(linear)


if _ONEDNN_LINEAR is not None:
    # torch.utils.flop_counter knows mm and addmm but not oneDNN's op: count it as the matmul it is

    @register_flop_formula(_ONEDNN_LINEAR)
    def _onednn_linear_flop(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        """Both overloads, ``(X, W, ...)`` and ``.binary`` ``(X, other, W, ...)``: 2 N K M."""
        flops = 2 * out_shape[-1]
        for d in x_shape:
            flops *= int(d)
        return flops
