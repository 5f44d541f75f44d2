"""A numerical guard for low-precision (bf16 / fp16) kernels on the CPU.

oneDNN picks its CPU kernels by instruction set and shape, and some of them are wrong. On Intel
Xeons with AMX, torch 2.13's bf16 grouped ``conv1d`` with 8 channels per group (the ``tiny``
preset's positional conv) returns values about 100% off, forward and backward, while 16 channels
per group, fp32, and the same shapes on AVX-512 CPUs without AMX are right. Nothing fails: the
model trains on garbage.

So each low-precision op that the models run on the CPU is checked once per process and per shape
configuration (channels, kernel, stride, groups, matmul sizes; a short probe length stands in for
the time axis), the first time it runs: the op's own code path, on a seeded probe rounded to the
low-precision dtype, against the same path in fp64 (which oneDNN does not run), output and every
input gradient. An op within :data:`TOLERANCE` runs as it is. One that is not runs as an *fp32
island* (inputs cast to fp32, output cast back to the low-precision dtype: the rest of the model
keeps its precision and gradients flow through the casts), or, should fp32 fail its check too,
as an fp32 island with oneDNN off; one warning line names the op, its shape, the error and the CPU.

A bug that depends on the time length alone would pass the probe; the shapes that decide oneDNN's
kernel (channels, groups, kernel, stride) are the model's own.

Environment:
    ``SPEECHVQ_KERNEL_GUARD=0`` turns the checks off (every op runs natively).
    ``SPEECHVQ_KERNEL_GUARD_FAIL=op[,op...]`` (or ``all``) treats those ops' low-precision check as
    failed, to route them to fp32 by hand (also what the tests use, via :func:`force_failure`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

TOLERANCE: dict[torch.dtype, float] = {torch.bfloat16: 0.05, torch.float16: 0.01}
"""Largest relative error (Frobenius norm of the difference over the norm of the fp64 result)
that a low-precision op may show on its probe, output and every input gradient. A correct bf16
kernel shows 0.002-0.01 (rounding to 8 bits of mantissa); the AMX grouped-conv bug shows ~1.1."""

NATIVE, FP32, FP32_NO_ONEDNN = "native", "fp32", "fp32, oneDNN off"
"""How a checked op runs: as it is, as an fp32 island, or as an fp32 island with oneDNN off."""


@dataclass(frozen=True)
class Verdict:
    """What the check of one op found."""

    op: str
    """The op's name, e.g. ``grouped_conv1d``."""
    shape: str
    """Its shape configuration, e.g. ``channels 32, groups 4, kernel 16``."""
    dtype: torch.dtype
    """The low-precision dtype it was checked in."""
    error: float
    """Largest relative error over the output and the input gradients, in that dtype."""
    mode: str
    """How it runs: :data:`NATIVE`, :data:`FP32` or :data:`FP32_NO_ONEDNN`."""
    forced: bool = False
    """True when the failure was forced (``SPEECHVQ_KERNEL_GUARD_FAIL`` / :func:`force_failure`)."""


_verdicts: dict[tuple[str, str, torch.dtype], Verdict] = {}
_forced: set[str] = set()


def _env_forced() -> set[str]:
    return {op.strip() for op in os.environ.get("SPEECHVQ_KERNEL_GUARD_FAIL", "").split(",") if op.strip()}


def enabled() -> bool:
    """Whether the guard checks ops (``SPEECHVQ_KERNEL_GUARD`` is not ``0``)."""
    return os.environ.get("SPEECHVQ_KERNEL_GUARD", "1").strip().lower() not in ("0", "off", "false", "no")


def low_precision_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype an op on ``x`` computes in when that is bf16 or fp16 on the CPU (``x``'s own, or
    CPU autocast's), else None."""
    if x.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu") and x.is_floating_point() and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype("cpu")
        if dtype in TOLERANCE:
            return dtype
    return x.dtype if x.dtype in TOLERANCE else None


@functools.cache
def cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide oneDNN's kernels, e.g.
    ``Intel(R) Xeon(R) Platinum 8480+ (AVX512, amx_bf16)``."""
    name, flags = "", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if name and flags:
                break
    name = name or platform.processor() or platform.machine()
    isa = [torch.backends.cpu.get_cpu_capability()]
    isa += sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_fp16"))
    return f"{name} ({', '.join(isa)})"


def verdicts() -> list[Verdict]:
    """Every check done in this process so far."""
    return list(_verdicts.values())


def reset_() -> None:
    """Forget every verdict (the next use of each op checks it again)."""
    _verdicts.clear()


@contextlib.contextmanager
def force_failure(*ops: str) -> Iterator[None]:
    """Within the block, treat these ops' low-precision check as failed (``all``: every op), as
    ``SPEECHVQ_KERNEL_GUARD_FAIL`` does; verdicts are forgotten on entry and exit."""
    reset_()
    _forced.update(ops)
    try:
        yield
    finally:
        _forced.difference_update(ops)
        reset_()


def mode(
    op: str,
    shape: str,
    dtype: torch.dtype,
    fn: Callable[..., Tensor],
    make_inputs: Callable[[torch.Generator], Sequence[Tensor]],
) -> str:
    """How ``op`` with this shape configuration runs in ``dtype`` on this CPU (checked once).

    Args:
        op: the op's name.
        shape: its shape configuration, as text (the cache key, and what the warning names).
        dtype: bf16 or fp16.
        fn: the op's code path, ``fn(*inputs) -> output``, for inputs of any one floating dtype;
            it must not use autocast or randomness.
        make_inputs: the probe's fp32 inputs (each gets a gradient), drawn from the generator.

    Returns:
        :data:`NATIVE`, :data:`FP32` or :data:`FP32_NO_ONEDNN`.
    """
    if not enabled():
        return NATIVE
    key = (op, shape, dtype)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _verdicts[key] = _check(op, shape, dtype, fn, make_inputs)
    return verdict.mode


def call(
    op: str,
    shape: str,
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor | None],
    make_inputs: Callable[[torch.Generator], Sequence[Tensor]],
) -> Tensor:
    """``fn(*inputs)``, in the way its check chose: as it is (under the caller's autocast), or as
    an fp32 island whose output has the low-precision dtype. ``inputs[0]`` decides the dtype;
    None inputs are passed through. Off the CPU, or in fp32, it is ``fn(*inputs)``."""
    dtype = low_precision_dtype(inputs[0])  # type: ignore[arg-type]
    if dtype is None:
        return fn(*inputs)
    how = mode(op, shape, dtype, fn, make_inputs)
    if how == NATIVE:
        return fn(*inputs)
    return island(how, dtype, fn, inputs)


def call_checked(
    op: str,
    shape: str,
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    probe_fn: Callable[..., Tensor],
    make_inputs: Callable[[torch.Generator], Sequence[Tensor]],
) -> Tensor:
    """:func:`call` for an op whose run has what a probe must not (dropout, a mask): ``fn`` runs
    in the way the check of ``probe_fn``, the same kernel without them, chose."""
    dtype = low_precision_dtype(inputs[0])
    if dtype is None:
        return fn(*inputs)
    how = mode(op, shape, dtype, probe_fn, make_inputs)
    if how == NATIVE:
        return fn(*inputs)
    return island(how, dtype, fn, inputs)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, checked once per shape in bf16 / fp16 on the CPU."""
    if low_precision_dtype(x) is None:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    shape = f"{in_features} -> {out_features}{'' if bias is not None else ', no bias'}"
    probe = [(64, in_features), (out_features, in_features)] + ([(out_features,)] if bias is not None else [])
    return call("linear", shape, F.linear, [x, weight, bias], randn_inputs(*probe))


def conv1d(conv: torch.nn.Conv1d, x: Tensor) -> Tensor:
    """``conv(x)`` for ``x`` ``[B, C_in, T]``, checked once per shape in bf16 / fp16 on the CPU."""
    if low_precision_dtype(x) is None:
        return conv._conv_forward(x, conv.weight, conv.bias)
    (kernel,), (stride,), (dilation,) = conv.kernel_size, conv.stride, conv.dilation
    shape = (
        f"in {conv.in_channels}, out {conv.out_channels}, kernel {kernel}, stride {stride}, "
        f"dilation {dilation}, groups {conv.groups}, padding {conv.padding}"
    )
    frames = dilation * (kernel - 1) + stride * 49 + 1  # 50 output frames without padding
    probe = [(2, conv.in_channels, frames), tuple(conv.weight.shape)]
    probe += [(conv.out_channels,)] if conv.bias is not None else []

    def run(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return conv._conv_forward(x, weight, bias)

    return call("conv1d", shape, run, [x, conv.weight, conv.bias], randn_inputs(*probe))


def island(
    how: str, dtype: torch.dtype, fn: Callable[..., Tensor], inputs: Sequence[Tensor | None]
) -> Tensor:
    """``fn`` on the inputs cast to fp32 with autocast off (and oneDNN off for
    :data:`FP32_NO_ONEDNN`), its output cast to ``dtype``."""
    with _fp32_context(how):
        out = fn(*[t.float() if t is not None and t.is_floating_point() else t for t in inputs])
    return out.to(dtype)


def _fp32_context(how: str) -> contextlib.AbstractContextManager[None]:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if how == FP32_NO_ONEDNN:
        stack.enter_context(onednn_off())
    return stack


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """oneDNN off within the block (``torch.backends.mkldnn.flags`` would also set its TF32
    flag, with a warning about Intel GPUs)."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def _relative_errors(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], upstream: Tensor, how: str
) -> float:
    """Largest relative error of ``fn`` (run ``how``) against fp64, output and input gradients."""

    def run(values: Sequence[Tensor], context: contextlib.AbstractContextManager[None]) -> list[Tensor]:
        leaves = [v.detach().requires_grad_(True) for v in values]
        with context:
            out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype), allow_unused=True)
        return [out.detach().double()] + [
            g.double() if g is not None else torch.zeros_like(v, dtype=torch.float64)
            for g, v in zip(grads, leaves, strict=True)
        ]

    reference = run([v.double() for v in inputs], torch.autocast("cpu", enabled=False))
    if how == NATIVE:
        got = run(inputs, torch.autocast("cpu", enabled=False))
    else:
        got = run([v.float() for v in inputs], _fp32_context(how))
    worst = 0.0
    for g, r in zip(got, reference, strict=True):
        norm = float(r.norm())
        error = float((g - r).norm()) / norm if norm > 0 else float((g - r).norm())
        worst = max(worst, error if error == error else float("inf"))  # NaN counts as wrong
    return worst


def _check(
    op: str,
    shape: str,
    dtype: torch.dtype,
    fn: Callable[..., Tensor],
    make_inputs: Callable[[torch.Generator], Sequence[Tensor]],
) -> Verdict:
    """Run the probe in ``dtype``, then (if wrong) fp32 and fp32 without oneDNN, and decide."""
    limit = TOLERANCE[dtype]
    with torch.inference_mode(False), torch.enable_grad():
        generator = torch.Generator().manual_seed(0x5EED)
        inputs = [t.to(dtype) for t in make_inputs(generator)]  # every mode sees the same values
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            shape_out = fn(*inputs).shape
        upstream = torch.randn(shape_out, generator=generator).to(dtype)
        error = _relative_errors(fn, inputs, upstream, NATIVE)
        forced = bool({op, "all"} & (_forced | _env_forced()))
        if error <= limit and not forced:
            logger.debug("%s %s (%s): relative error %.2g, native", dtype, op, shape, error)
            return Verdict(op, shape, dtype, error, NATIVE)
        fallback, fallback_error = FP32_NO_ONEDNN, float("inf")
        for how in (FP32, FP32_NO_ONEDNN):
            fallback_error = _relative_errors(fn, inputs, upstream, how)
            if fallback_error <= limit:
                fallback = how
                break
    what = f"{str(dtype).removeprefix('torch.')} {op} ({shape})"
    if forced:
        message = f"{what} runs in {fallback} on this CPU, {cpu_name()}: its check is forced to fail by "
        message += f"SPEECHVQ_KERNEL_GUARD_FAIL (measured relative error {error:.3g})"
    else:
        message = f"{what} is wrong on this CPU, {cpu_name()}: relative error {error:.3g} against fp64 "
        message += f"(limit {limit}); it runs in {fallback} instead"
    if fallback_error > limit:
        message += f", the least wrong (relative error {fallback_error:.3g}: fp32 is wrong here too)"
    logger.warning("%s", message)
    return Verdict(op, shape, dtype, error, fallback, forced=forced)


def randn_inputs(*shapes: Sequence[int]) -> Callable[[torch.Generator], list[Tensor]]:
    """``make_inputs`` for :func:`mode` / :func:`call`: standard normal tensors of these shapes,
    each scaled by ``1 / sqrt(last dim)`` after the first so that products stay near unit scale."""

    def make(generator: torch.Generator) -> list[Tensor]:
        out = []
        for i, shape in enumerate(shapes):
            t = torch.randn(tuple(shape), generator=generator)
            out.append(t if i == 0 else t / max(shape[-1], 1) ** 0.5)
        return out

    return make
