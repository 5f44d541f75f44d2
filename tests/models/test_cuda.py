"""The CUDA path: the same training step as the CPU's, and the same outputs as transformers' there.

The CPU has its own fast paths (encoder layers as matmuls, a flipped-kernel positional conv
backward, integer dropout draws, zeroed padded rows); CUDA takes the plain ones. These tests pin
that both compute one function. They need a GPU and are skipped without one (CI has none; they
were run on a lent H100, see docs/performance.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from speechvq import build_wav2vec2, preset
from speechvq.config import FeatureEncoderConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _true_fp32() -> Iterator[None]:
    """fp32 means fp32: no TF32 matmuls or convolutions (cuDNN's default allows them)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _no_dropout(name: str, norm_mode: str):
    cfg = preset(name)
    cfg.encoder = FeatureEncoderConfig(
        conv_layers=cfg.encoder.conv_layers, norm_mode=norm_mode, conv_bias=norm_mode == "layer_norm"
    )
    cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.context.activation_dropout_p = 0.0
    cfg.context.layer_drop_p = 0.0
    cfg.feature_dropout_p = cfg.quantizer.dropout_p = 0.0
    cfg.mask.min_masks = 2
    return cfg


def _padded_batch(num: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([16000, 12300, 9100, 7000][:num])
    x = torch.randn(num, 16000, generator=g) * 0.3
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0.0
    return x, lengths


def _step(model, x, lengths, masked_only: bool, autocast: torch.dtype | None = None):
    """One training forward + backward; masks, distractors and Gumbel noise from CPU generators
    (one per utterance), which draw the same numbers whichever device the model is on."""
    model.zero_grad(set_to_none=True)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(x.size(0))]
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(x.to(device), lengths.to(device), generator=gens, masked_only=masked_only)
        loss = model.compute_loss(out)
    (loss.total / loss.num_targets).backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    terms = {
        k: float(getattr(loss, k).detach()) / loss.num_targets
        for k in ("contrastive", "diversity", "feature_penalty")
    }
    return out, terms, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("name", "norm_mode", "masked_only"),
    [("tiny", "group_norm", False), ("tiny", "layer_norm", True), ("base", "group_norm", True)],
)
def test_cuda_training_step_equals_the_cpu_one(name, norm_mode, masked_only):
    torch.manual_seed(0)
    cpu = build_wav2vec2(_no_dropout(name, norm_mode)).train()
    gpu = copy.deepcopy(cpu).cuda()
    x, lengths = _padded_batch()
    out_c, terms_c, grads_c = _step(cpu, x, lengths, masked_only)
    out_g, terms_g, grads_g = _step(gpu, x, lengths, masked_only)

    assert torch.equal(out_c.mask, out_g.mask.cpu())
    assert torch.equal(out_c.distractor_index, out_g.distractor_index.cpu())
    valid = torch.arange(out_c.mask.size(1))[None, :] < out_c.lengths[:, None]  # CPU padding is zeroed
    assert torch.equal(out_c.quantizer.codes[valid], out_g.quantizer.codes.cpu()[valid])
    torch.testing.assert_close(out_g.logits.cpu(), out_c.logits, atol=2e-4, rtol=1e-4)
    for k in terms_c:
        assert terms_g[k] == pytest.approx(terms_c[k], rel=1e-4, abs=1e-6), k
    assert grads_c.keys() == grads_g.keys()
    assert "mask_embedding" in grads_c and "quantizer.codevectors" in grads_c
    scale = max(float(g.norm()) for g in grads_c.values())
    for n in grads_c:
        if float(grads_c[n].norm()) < 1e-7 * scale:  # zero up to rounding (the key bias, in theory)
            assert float(grads_g[n].norm()) < 1e-6 * scale, n
        else:
            assert _rel(grads_g[n], grads_c[n]) < 1e-3, n


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_cuda_autocast_step_tracks_fp32(precision):
    torch.manual_seed(0)
    model = build_wav2vec2(_no_dropout("small", "group_norm")).train().cuda()
    x, lengths = _padded_batch(4)
    _, terms32, grads32 = _step(model, x, lengths, masked_only=True)
    out, terms, grads = _step(model, x, lengths, masked_only=True, autocast=precision)
    assert out.logits.dtype == torch.float32  # the logits and the loss stay in fp32
    assert terms["contrastive"] == pytest.approx(terms32["contrastive"], rel=2e-2)
    assert terms["diversity"] == pytest.approx(terms32["diversity"], rel=2e-2)
    flat = torch.cat([grads[n].flatten() for n in grads32])
    flat32 = torch.cat([grads32[n].flatten() for n in grads32])
    assert torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, flat32, dim=0) > 0.98


@pytest.mark.parametrize("name", ["tiny", "base"])
@torch.no_grad()
def test_cuda_outputs_equal_transformers_on_cuda(name):
    from speechvq.interop.hf import to_hf
    from speechvq.models.masking import compute_span_mask, sample_distractors

    torch.manual_seed(0)
    cfg = _no_dropout(name, "layer_norm")  # transformers supports padding only with layer norm
    model = build_wav2vec2(cfg).eval().cuda()
    hf = to_hf(model).eval().cuda()
    x, lengths = _padded_batch(2)
    x, lengths = x.cuda(), lengths.cuda()
    frame_lengths = model.feature_encoder.output_lengths(lengths)
    frames = int(model.feature_encoder.output_lengths(torch.tensor([x.size(1)]))[0])
    g = torch.Generator().manual_seed(3)
    mask = compute_span_mask(
        frame_lengths.cpu(), frames, mask_prob=0.65, mask_length=10, min_masks=2, generator=g
    )
    target_index, distractors = sample_distractors(mask, cfg.loss.num_negatives, g)
    hf_neg = torch.zeros(x.size(0) * frames, distractors.size(1), dtype=torch.long)
    hf_neg[target_index] = distractors
    attention = (torch.arange(x.size(1), device="cuda")[None, :] < lengths[:, None]).long()

    out = model(x, lengths, mask=mask.cuda(), distractor_index=distractors.cuda())
    ref = hf(
        x,
        attention_mask=attention,
        mask_time_indices=mask.cuda(),
        sampled_negative_indices=hf_neg.view(x.size(0), frames, -1).cuda(),
        output_hidden_states=True,
    )
    valid = torch.arange(frames, device="cuda")[None, :] < frame_lengths[:, None]
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.predictions, ref.projected_states[mask.cuda()], atol=1e-4, rtol=0)
    from speechvq.losses import contrastive_loss

    torch.testing.assert_close(contrastive_loss(out.logits), ref.contrastive_loss, atol=1e-4, rtol=1e-5)
