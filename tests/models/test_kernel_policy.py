"""The kernel seam: the fast kernels and plain PyTorch compute one training step alike, and the
model files hold no device or dtype branch (those live in models/kernels/)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from speechvq import build_wav2vec2, preset
from speechvq.config import Wav2Vec2Config
from speechvq.models import kernels
from speechvq.models.ctc import build_ctc_model, ctc_config_from_wav2vec2

_FP32_RTOL = 1e-4
"""fp32: fast and plain differ in summation order only (oneDNN against MKL matmuls, im2col and
window blocks against the conv kernel, packed against padded blocks): ~1e-6 relative, seen."""

_BF16_FACTOR = 2.0
"""bf16: each path rounds to 8 bits of mantissa in different places (the fast first layer applies
its GroupNorm in fp32 before rounding, the plain one after; the fast positional conv casts its
weight once), so neither is nearer the truth: fast and plain must differ by at most this times the
larger of their distances to the fp32 step (sqrt(2) if their rounding errors were independent;
seen: 2-12% per gradient from fp32, 3-5% from each other)."""

_ABS = 1e-5
"""Floor of every gradient bound, relative to the norm of the whole gradient: gradients that are
zero in exact arithmetic (the key projection's bias: softmax ignores a constant per query) are
rounding noise, ~1e-11 (fp32) and ~1e-7 (bf16) of it."""


def _no_dropout(cfg: Wav2Vec2Config) -> Wav2Vec2Config:
    """Dropout off everywhere, so that no random stream is drawn differently by the two paths."""
    c = cfg.context
    c.dropout_p = c.attention_dropout_p = c.activation_dropout_p = c.layer_drop_p = 0.0
    cfg.feature_dropout_p = cfg.quantizer.dropout_p = 0.0
    return cfg


def _layer_norm_small() -> Wav2Vec2Config:
    """SMALL with the LARGE model's layer-norm conv encoder and pre-LN blocks."""
    cfg = preset("small")
    cfg.encoder.norm_mode = "layer_norm"
    cfg.context.layer_norm_first = True
    return cfg


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three utterances, two padded: the fast path convolves them one at a time and packs them."""
    waves = torch.randn(3, 8000, generator=torch.Generator().manual_seed(1))
    return waves, torch.tensor([8000, 6100, 4400])


def _pretrain_step(model, waves, lengths, mask, distractors, dtype) -> tuple[torch.Tensor, dict]:
    """Loss and every gradient of one wav2vec 2.0 step with the given mask and distractors."""
    model.zero_grad()
    gumbel = [torch.Generator().manual_seed(10 + b) for b in range(len(lengths))]  # per utterance
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(
            waves, lengths, mask=mask, distractor_index=distractors, generator=gumbel, masked_only=True
        )
        loss = model.compute_loss(out).total
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ctc_step(model, waves, lengths, dtype) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    targets = torch.randint(1, 10, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model.compute_loss(model(waves, lengths), targets, torch.tensor([6, 5, 3]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(fast: tuple, plain: tuple, fp32: tuple | None = None) -> None:
    """Losses and every gradient close: fp32 steps within :data:`_FP32_RTOL`; bf16 steps (with
    ``fp32``, the plain fp32 step) within :data:`_BF16_FACTOR` of their distance to it."""
    (fast_loss, fast_grads), (plain_loss, plain_grads) = fast, plain
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    total = float(torch.sqrt(sum(g.float().norm() ** 2 for g in plain_grads.values())))
    if fp32 is None:
        torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=0.0)
    else:
        loss_bound = _BF16_FACTOR * max(abs(float(fast_loss - fp32[0])), abs(float(plain_loss - fp32[0])))
        assert abs(float(fast_loss - plain_loss)) <= loss_bound + 1e-6 * abs(float(fp32[0]))
    for name, want in plain_grads.items():
        error = float((fast_grads[name] - want).norm())
        if fp32 is None:
            bound = _FP32_RTOL * float(want.norm())
        else:
            ref = fp32[1][name]
            bound = _BF16_FACTOR * max(float((fast_grads[name] - ref).norm()), float((want - ref).norm()))
        assert error <= bound + _ABS * total, f"{name}: |fast - plain| = {error:.3g}, bound {bound:.3g}"


def _fast_and_plain(build):
    """The same model twice, built fast and switched to plain (the same parameters)."""
    torch.manual_seed(0)
    fast = build().train()
    plain = kernels.select_(copy.deepcopy(fast), fast=False)
    return fast, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["tiny", "small", "small_layer_norm"])
def test_fast_and_plain_kernels_give_one_pretraining_step(arch, dtype):
    cfg = _no_dropout(_layer_norm_small() if arch == "small_layer_norm" else preset(arch))
    fast, plain = _fast_and_plain(lambda: build_wav2vec2(cfg))
    assert type(plain.context).__module__ == "speechvq.models.context"
    assert type(fast.context).__module__ == "speechvq.models.kernels.context"
    waves, lengths = _batch()
    with torch.no_grad():  # one mask and one set of distractors for both
        drawn = plain(waves, lengths, generator=torch.Generator().manual_seed(3))
    step = (waves, lengths, drawn.mask, drawn.distractor_index)
    fp32 = _pretrain_step(plain, *step, torch.float32) if dtype == torch.bfloat16 else None
    _assert_same_step(_pretrain_step(fast, *step, dtype), _pretrain_step(plain, *step, dtype), fp32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_and_plain_kernels_give_one_ctc_step(dtype):
    cfg = ctc_config_from_wav2vec2(
        preset("tiny"), 10, mask={"mask_prob": 0.0, "channel_prob": 0.0}, freeze_updates=0,
        activation_dropout_p=0.0, layer_drop_p=0.0,
    )  # fmt: skip
    fast, plain = _fast_and_plain(lambda: build_ctc_model(cfg))
    waves, lengths = _batch()
    fp32 = _ctc_step(plain, waves, lengths, torch.float32) if dtype == torch.bfloat16 else None
    _assert_same_step(_ctc_step(fast, waves, lengths, dtype), _ctc_step(plain, waves, lengths, dtype), fp32)


def test_plain_build_has_the_fast_build_s_state_dict_and_switches_back_losslessly():
    torch.manual_seed(0)
    fast = build_wav2vec2(preset("tiny"))
    torch.manual_seed(0)
    plain = build_wav2vec2(preset("tiny"), fast=False)
    assert not any(type(m).__module__.startswith("speechvq.models.kernels") for m in plain.modules())
    want = fast.state_dict()
    got = plain.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    classes = [type(m) for m in fast.modules()]
    kernels.select_(kernels.select_(fast, fast=False), fast=True)
    assert [type(m) for m in fast.modules()] == classes


_BRANCH = re.compile(
    r"device\.type|is_cuda|\.is_cpu|dtype (==|!=|in)|== torch\.(bfloat16|float16|float32)|is_autocast|get_autocast"
)

_FP32_ISLANDS = {
    ("fbank.py", "with torch.autocast(device_type=waveforms.device.type, enabled=False):"),
    ("quantizer.py", "with torch.autocast(device_type=x.device.type, enabled=False):"),
    ("kmeans_quantizer.py", "with torch.autocast(device_type=x.device.type, enabled=False):"),
}
"""Numerics, not speed: autocast turned off so that the log-mel features, the Gumbel quantizer's
logits and perplexities, and the k-means distances and codebook updates run in fp32 whatever the
caller's precision (vector-quantize-pytorch practice). They name the device only to say which
autocast to turn off, and run the same on every device."""


def test_model_files_hold_no_device_or_dtype_branch_outside_the_kernels():
    models = Path(__file__).resolve().parents[2] / "src" / "speechvq" / "models"
    found = set()
    for path in sorted(models.glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if _BRANCH.search(line):
                found.add((path.name, line.split("#")[0].strip()))
    assert found <= _FP32_ISLANDS, sorted(found - _FP32_ISLANDS)
