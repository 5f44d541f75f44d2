"""Gumbel product quantizer."""

from __future__ import annotations

import math

import torch

from speechvq.models.quantizer import GumbelVectorQuantizer, perplexity


def _quantizer(**kw) -> GumbelVectorQuantizer:
    args = dict(
        input_dim=8, num_codebooks=2, codebook_size=5, codevector_dim=6, temperature=(2.0, 0.5, 0.999995)
    )
    args.update(kw)
    return GumbelVectorQuantizer(**args)


def test_eval_is_deterministic_and_codes_to_vectors_round_trips():
    q = _quantizer().eval()
    x = torch.randn(3, 7, 8)
    a, b = q(x), q(x)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.codes, b.codes)
    assert torch.equal(q.codes_to_vectors(a.codes), a.quantized)
    assert a.codes.shape == (3, 7, 2)


def test_temperature_anneals_from_the_num_updates_buffer_and_survives_state_dict():
    q = _quantizer()
    assert q.temperature == 2.0
    q.set_num_updates_(100000)
    assert math.isclose(q.temperature, max(2.0 * 0.999995**100000, 0.5))
    q.set_num_updates_(10**7)
    assert q.temperature == 0.5
    other = _quantizer()
    other.load_state_dict(q.state_dict())
    assert other.temperature == 0.5


def test_training_uses_hard_one_hot_straight_through_samples():
    q = _quantizer().train()
    x = torch.randn(4, 6, 8, requires_grad=True)
    out = q(x)
    # every quantized group vector is exactly one codeword
    book = q.codevectors[0].view(2, 5, 3)
    groups = out.quantized.view(4, 6, 2, 3)
    for gi in range(2):
        dists = (groups[:, :, gi, None, :] - book[gi][None, None]).abs().sum(-1)
        assert (dists.min(-1).values < 1e-6).all()
    out.quantized.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_perplexity_counts_only_selected_frames_and_keeps_finite_gradients_at_zero_probability():
    probs = torch.zeros(4, 1, 3)
    probs[:2, 0, 0] = 1.0
    probs[2:, 0, 1] = 1.0
    assert torch.isclose(perplexity(probs, None), torch.tensor(2.0))
    assert torch.isclose(perplexity(probs, torch.tensor([True, True, False, False])), torch.tensor(1.0))
    p = probs.clone().requires_grad_(True)
    perplexity(p, None).backward()
    assert torch.isfinite(p.grad).all()  # xlogy would give NaN for the never-used entry


def test_perplexities_span_g_to_gv():
    q = _quantizer().eval()
    out = q(torch.randn(50, 20, 8))
    assert 2.0 - 1e-5 <= out.code_perplexity.item() <= 10.0 + 1e-5
    assert 2.0 - 1e-5 <= out.prob_perplexity.item() <= 10.0 + 1e-5


def test_per_utterance_gumbel_noise_is_gumbel_distributed_and_zero_on_padding():
    # the per-utterance noise is -log(E) with E ~ Exp(1) from fp64 uniforms: check the Gumbel(0, 1)
    # CDF exp(-exp(-x)), mean (Euler's gamma) and variance (pi^2 / 6), and that utterance b's
    # valid frames come from generator b alone
    from speechvq.models.quantizer import _gumbel_noise_per_utterance

    lengths = torch.tensor([700, 420])
    valid = torch.arange(700)[None, :] < lengths[:, None]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = _gumbel_noise_per_utterance(torch.zeros(2, 700, 2, 320), valid, gens)
    assert noise.dtype == torch.float32 and bool(torch.isfinite(noise).all())
    assert not noise[1, 420:].any()
    draws = noise[valid].double().reshape(-1)  # 1120 frames x 640 = 716,800 draws
    for x in (-1.0, 0.0, 0.5, 2.0, 5.0):
        want = math.exp(-math.exp(-x))
        assert abs(float((draws <= x).double().mean()) - want) < 3e-3
    assert abs(float(draws.mean()) - 0.5772157) < 6e-3
    assert abs(float(draws.var()) - math.pi**2 / 6) < 2e-2
    alone = _gumbel_noise_per_utterance(torch.zeros(1, 420, 2, 320), None, [torch.Generator().manual_seed(2)])
    assert torch.equal(alone[0], noise[1, :420])
