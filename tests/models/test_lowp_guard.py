"""The low-precision kernel guard: wrong bf16 kernels are caught and run in fp32 instead.

On Intel CPUs with AMX, oneDNN's bf16 grouped conv1d with 8 channels per group is wrong (the
``tiny`` preset's positional conv). Other CPUs compute it right, so these tests also simulate that
bug (``_amx_like_conv1d``: the right result with its channels rotated, ~100% off, as measured
there) and check that the guard catches it wherever the suite runs; on an AMX CPU the unpatched
cases meet the real bug.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from speechvq import build_wav2vec2, preset
from speechvq.config import QuantizerConfig, VqWav2VecConfig
from speechvq.models.common import Conv1d
from speechvq.models.kernels import context as context_module
from speechvq.models.kernels import lowp_guard
from speechvq.models.kernels.linear import linear
from speechvq.models.vq_wav2vec import build_vq_wav2vec

_REAL_CONV1D = F.conv1d


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test checks its ops anew (verdicts are per process), with the guard on."""
    monkeypatch.delenv("SPEECHVQ_KERNEL_GUARD", raising=False)
    monkeypatch.delenv("SPEECHVQ_KERNEL_GUARD_FAIL", raising=False)
    lowp_guard.reset_()
    yield
    lowp_guard.reset_()


def _amx_like_conv1d(
    wrong_when: Callable[[torch.Tensor, torch.Tensor, int], bool],
) -> Callable[..., torch.Tensor]:
    """``F.conv1d`` that returns wrong values (its output channels rotated by one) where
    ``wrong_when(input, weight, groups)``."""

    def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        y = _REAL_CONV1D(x, weight, bias, stride, padding, dilation, groups)
        return y.roll(1, dims=1) if wrong_when(x, weight, groups) else y

    return conv1d


def _bf16_eight_per_group(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """The AMX bug's shapes: bf16, grouped, 8 input channels per group."""
    return x.dtype == torch.bfloat16 and groups > 1 and weight.size(1) == 8


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _positional_conv_run(pos: torch.nn.Module, x: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    """Output and gradients (input, then parameters) of the positional conv."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = pos(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(y.float(), [x, *pos.parameters()], upstream)
    return [y, *grads]


def test_guard_catches_a_wrong_bf16_grouped_conv_and_runs_it_in_fp32(monkeypatch, caplog):
    pos = context_module.FastConvPositionalEmbedding(32, 16, 4)  # tiny's: 8 channels per group
    x = torch.randn(2, 40, 32, requires_grad=True)
    want = _positional_conv_run(pos, x, bf16=False)
    monkeypatch.setattr(F, "conv1d", _amx_like_conv1d(_bf16_eight_per_group))

    # without the guard the bug reaches the output (so this test can fail)
    monkeypatch.setenv("SPEECHVQ_KERNEL_GUARD", "0")
    assert _relative(_positional_conv_run(pos, x, bf16=True)[0], want[0]) > 0.5
    assert lowp_guard.verdicts() == []
    monkeypatch.delenv("SPEECHVQ_KERNEL_GUARD")

    with caplog.at_level(logging.WARNING, logger="speechvq.models.kernels.lowp_guard"):
        got = _positional_conv_run(pos, x, bf16=True)
        again = _positional_conv_run(pos, x, bf16=True)
    for g, w in zip(got, want, strict=True):
        assert _relative(g, w) < 2e-2
    assert got[0].dtype == torch.bfloat16  # the rest of the model keeps its precision
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
    (verdict,) = lowp_guard.verdicts()
    assert (verdict.op, verdict.shape, verdict.mode) == (
        "grouped_conv1d",
        "channels 32, groups 4, kernel 16",
        lowp_guard.FP32,
    )
    assert verdict.error > 0.5 and not verdict.forced
    # one warning line, once per process, naming the op, its shape and the CPU
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert "bfloat16 grouped_conv1d (channels 32, groups 4, kernel 16) is wrong" in message
    assert lowp_guard.cpu_name() in message and "runs in fp32" in message


def test_guard_keeps_a_right_kernel_native(caplog):
    # 16 channels per group (small, base): the same path, nothing to fall back from
    pos = context_module.FastConvPositionalEmbedding(64, 16, 4)
    x = torch.randn(2, 30, 64, requires_grad=True)
    with caplog.at_level(logging.WARNING):
        got = _positional_conv_run(pos, x, bf16=True)
    want = _positional_conv_run(pos, x, bf16=False)
    (verdict,) = lowp_guard.verdicts()
    assert verdict.mode == lowp_guard.NATIVE and verdict.error < lowp_guard.TOLERANCE[torch.bfloat16]
    assert not caplog.records
    for g, w in zip(got, want, strict=True):
        assert _relative(g, w) < 2e-2


def test_guard_falls_back_to_onednn_off_when_fp32_is_wrong_too(monkeypatch, caplog):
    # a conv wrong in every precision that oneDNN runs: fp32 with oneDNN off is the way out
    def on_onednn(x, weight, groups):
        return (
            x.dtype != torch.float64
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
        )

    monkeypatch.setattr(F, "conv1d", _amx_like_conv1d(on_onednn))
    conv = Conv1d(16, 16, 5, padding=2, groups=2)
    x = torch.randn(2, 16, 30)
    with caplog.at_level(logging.WARNING), torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv(x)
    with lowp_guard.onednn_off():
        want = conv(x)  # fp32 ops are not guarded: this is the plain conv without oneDNN
    assert [v.mode for v in lowp_guard.verdicts()] == [lowp_guard.FP32_NO_ONEDNN]
    assert got.dtype == torch.bfloat16 and _relative(got, want) < 1e-2
    assert "oneDNN off" in caplog.records[0].getMessage()


def test_guard_off_and_forced_failure_from_the_environment(monkeypatch, caplog):
    x, weight, bias = torch.randn(5, 24), torch.randn(12, 24), torch.randn(12)
    monkeypatch.setenv("SPEECHVQ_KERNEL_GUARD", "0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x, weight, bias)
    assert lowp_guard.verdicts() == []

    monkeypatch.setenv("SPEECHVQ_KERNEL_GUARD", "1")
    monkeypatch.setenv("SPEECHVQ_KERNEL_GUARD_FAIL", "linear")
    with caplog.at_level(logging.WARNING), torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear(x, weight, bias)
    (verdict,) = lowp_guard.verdicts()
    assert verdict.forced and verdict.mode == lowp_guard.FP32
    assert got.dtype == torch.bfloat16
    # the fp32 island: the fp32 product rounded once to bf16
    assert torch.equal(got, F.linear(x, weight, bias).to(torch.bfloat16))
    assert "forced to fail by SPEECHVQ_KERNEL_GUARD_FAIL" in caplog.records[0].getMessage()


def test_check_draws_no_global_randomness_and_runs_under_inference_mode():
    model = build_wav2vec2(preset("tiny")).eval()
    waves = torch.randn(2, 4000)
    torch.manual_seed(3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # export, transcribe
        first, _ = model.extract_features(waves)
        state = torch.get_rng_state()
    assert len(lowp_guard.verdicts()) >= 5  # encoder convs, positional conv, attention, linears
    torch.manual_seed(3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # verdicts cached
        second, _ = model.extract_features(waves)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _tiny_step(model: torch.nn.Module, bf16: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Every block's features and the gradients of a fixed projection of them, in training mode
    (dropout on: its draws come from the global seed, the same in both precisions)."""
    waves = torch.randn(3, 8000, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([8000, 6000, 5000])
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        features, _ = model.extract_features(waves, lengths)
    upstream = torch.Generator().manual_seed(2)
    loss = sum((f.float() * torch.randn(f.shape, generator=upstream)).sum() for f in features)
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(("feature_", "context"))]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return [f.float() for f in features], {n: g for (n, _), g in zip(named, grads, strict=True)}


@pytest.mark.parametrize("case", ["as is", "with a wrong bf16 grouped conv", "every op forced to fp32"])
def test_tiny_in_bf16_matches_fp32_end_to_end(case, monkeypatch):
    # encoder convs, first-layer matmul, positional conv, attention (math path: dropout on) and
    # linears, forward and every gradient; "as is" meets the real oneDNN bug on an AMX CPU
    torch.manual_seed(0)
    model = build_wav2vec2(preset("tiny")).train()
    want_features, want_grads = _tiny_step(model, bf16=False)
    if case == "with a wrong bf16 grouped conv":
        monkeypatch.setattr(F, "conv1d", _amx_like_conv1d(_bf16_eight_per_group))
    if case == "every op forced to fp32":
        monkeypatch.setenv("SPEECHVQ_KERNEL_GUARD_FAIL", "all")
    got_features, got_grads = _tiny_step(model, bf16=True)
    for got, want in zip(got_features, want_features, strict=True):
        assert _relative(got, want) < 3e-2
    largest = max(float(g.norm()) for g in want_grads.values())
    for name, want in want_grads.items():
        if float(want.norm()) < 1e-4 * largest:
            continue  # zero in exact arithmetic (the key bias: softmax ignores a constant shift)
        assert _relative(got_grads[name], want) < 5e-2, name
    modes = {v.mode for v in lowp_guard.verdicts()}
    assert modes == ({lowp_guard.FP32} if case == "every op forced to fp32" else modes)
    if case == "with a wrong bf16 grouped conv":
        assert [v.op for v in lowp_guard.verdicts() if v.mode != lowp_guard.NATIVE] == ["grouped_conv1d"]


def test_vq_wav2vec_convs_and_step_projection_fall_back_alike():
    # Conv1d (encoder, causal aggregator, residual projections) and the step predictor's einsum
    cfg = VqWav2VecConfig(
        encoder_layers=((16, 10, 5), (16, 8, 4), (16, 4, 2)),
        aggregator_layers=((24, 2, 1), (24, 3, 1)),
        quantizer=QuantizerConfig(codebook_size=8, codevector_dim=16),
        prediction_steps=2,
        num_negatives=3,
    )
    torch.manual_seed(0)
    model = build_vq_wav2vec(cfg).eval()
    waves = torch.randn(2, 2000)

    def parts() -> list[torch.Tensor]:
        # each part on the same input (bf16 may flip a quantizer code, which the aggregator reads)
        features, lengths = model.feature_encoder(waves)
        quantized = torch.randn(2, features.size(1), 16, generator=torch.Generator().manual_seed(1))
        context = model.aggregator(quantized, lengths)
        steps = model.predictor(torch.randn(context.shape, generator=torch.Generator().manual_seed(2)))
        return [features, context, steps]

    with torch.no_grad():
        want = parts()
        with lowp_guard.force_failure("all"), torch.autocast("cpu", dtype=torch.bfloat16):
            got = parts()
            ops = {v.op for v in lowp_guard.verdicts()}
    assert ops == {"conv1d", "einsum btc,cds->btsd"}
    for g, w in zip(got, want, strict=True):
        assert _relative(g, w) < 2e-2
