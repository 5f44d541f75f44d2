"""speechvq vs transformers' Wav2Vec2ForPreTraining with the same weights: equal to 1e-4."""

from __future__ import annotations

import pytest
import torch

from speechvq import build_wav2vec2, preset
from speechvq.interop.hf import from_hf, load_hf, save_hf, to_hf
from speechvq.losses import contrastive_loss, diversity_loss
from speechvq.models.masking import compute_span_mask, sample_distractors

ATOL = 1e-4


def _no_dropout(name: str):
    cfg = preset(name)
    cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.context.activation_dropout_p = 0.0
    cfg.context.layer_drop_p = 0.0
    cfg.feature_dropout_p = cfg.quantizer.dropout_p = 0.0
    return cfg


@pytest.fixture(scope="module", params=["tiny", "small", "base", "large"])
def pair(request):
    torch.manual_seed(0)
    model = build_wav2vec2(_no_dropout(request.param)).eval()
    return request.param, model, to_hf(model)


def _batch(model):
    """Two utterances; padded (with an attention mask) for layer_norm models, whose transformers
    implementation supports padding; equal length for group_norm ones (transformers normalises the
    first conv layer over the padding too, so it cannot be compared on padded input)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16000, generator=g)
    if model.cfg.encoder.norm_mode == "layer_norm":
        lengths = torch.tensor([16000, 11000])
        x[1, 11000:] = 0.0
    else:
        lengths = torch.tensor([16000, 16000])
    attention = (torch.arange(16000)[None, :] < lengths[:, None]).long()
    return x, lengths, attention


def _mask_and_negatives(model, x, lengths, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    frame_lengths = model.feature_encoder.output_lengths(lengths)
    frames = int(model.feature_encoder.output_lengths(torch.tensor([x.size(1)]))[0])
    m = model.cfg.mask
    mask = compute_span_mask(
        frame_lengths, frames, mask_prob=m.mask_prob, mask_length=m.mask_length, min_masks=2, generator=g
    )
    target_index, distractors = sample_distractors(mask, model.cfg.loss.num_negatives, g)
    # transformers wants [B, T, K] flat indices at each masked frame
    hf_neg = torch.zeros(x.size(0) * frames, distractors.size(1), dtype=torch.long)
    hf_neg[target_index] = distractors
    return frame_lengths, mask, distractors, hf_neg.view(x.size(0), frames, -1)


def test_parameter_counts_equal_transformers(pair):
    name, model, hf = pair
    ours = sum(p.numel() for p in model.parameters())
    theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs
    expected = {"base": 95.0e6, "large": 317.4e6}
    if name in expected:
        assert abs(ours - expected[name]) / expected[name] < 0.005


@torch.no_grad()
def test_eval_outputs_and_losses_equal_transformers(pair):
    _, model, hf = pair
    x, lengths, attention = _batch(model)
    frame_lengths, mask, distractors, hf_neg = _mask_and_negatives(model, x, lengths)
    out = model(x, lengths, mask=mask, distractor_index=distractors)
    ref = hf(
        x,
        attention_mask=attention,
        mask_time_indices=mask,
        sampled_negative_indices=hf_neg,
        output_hidden_states=True,
    )
    valid = torch.arange(mask.size(1))[None, :] < frame_lengths[:, None]

    # feature encoder
    ref_features = hf.wav2vec2.feature_extractor(x).transpose(1, 2)
    torch.testing.assert_close(out.features[valid], ref_features[valid], atol=ATOL, rtol=0)
    # every Transformer layer (transformers: input of block 1, then each block's output)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours[valid], theirs[valid], atol=ATOL, rtol=0)
    # projected states at the masked frames
    torch.testing.assert_close(out.predictions, ref.projected_states[mask], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.targets, ref.projected_quantized_states[mask], atol=ATOL, rtol=0)
    # quantized vectors and codes
    extract = hf.wav2vec2(x, attention_mask=attention, mask_time_indices=mask).extract_features
    ref_quantized, ref_ppl = hf.quantizer(extract, mask_time_indices=mask)
    torch.testing.assert_close(out.quantizer.quantized[valid], ref_quantized[valid], atol=ATOL, rtol=0)
    g, v = model.quantizer.num_codebooks, model.quantizer.codebook_size
    ref_codes = hf.quantizer.weight_proj(extract).view(*mask.shape, g, v).argmax(-1)
    assert torch.equal(out.quantizer.codes[valid], ref_codes[valid])
    assert torch.equal(model.quantizer.codes_to_vectors(out.quantizer.codes), out.quantizer.quantized)
    # losses: contrastive, and diversity. Both count the masked frames in the perplexities;
    # transformers in eval mode puts the hard-code perplexity in its diversity loss, speechvq (as
    # fairseq) the softmax one in both modes, so eval compares the hard one.
    torch.testing.assert_close(contrastive_loss(out.logits), ref.contrastive_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.quantizer.code_perplexity, ref_ppl, atol=ATOL, rtol=0)
    ours_div = out.num_targets * diversity_loss(out.quantizer.code_perplexity, model.quantizer.num_codes)
    torch.testing.assert_close(ours_div, ref.diversity_loss, atol=ATOL, rtol=0)


def test_train_mode_losses_equal_transformers_with_same_gumbel_noise(pair):
    _, model, hf = pair
    model.train()
    hf.train()
    try:
        model.set_num_updates_(1234)
        hf.set_gumbel_temperature(model.quantizer.temperature)
        x, lengths, attention = _batch(model)
        _, mask, distractors, hf_neg = _mask_and_negatives(model, x, lengths, seed=11)
        torch.manual_seed(99)
        out = model(x, lengths, mask=mask, distractor_index=distractors)
        torch.manual_seed(99)
        ref = hf(x, attention_mask=attention, mask_time_indices=mask, sampled_negative_indices=hf_neg)
        # the training loss's own terms, as the trainer computes them
        loss = model.compute_loss(out)
        torch.testing.assert_close(loss.contrastive, ref.contrastive_loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            loss.diversity / model.cfg.loss.diversity_weight, ref.diversity_loss, atol=ATOL, rtol=0
        )
        # gradients flow and are finite through the straight-through estimator
        model.compute_loss(out).total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.quantizer.codevectors.grad is not None
    finally:
        model.set_num_updates_(0)
        model.eval()
        hf.eval()


def test_round_trip_speechvq_hf_speechvq_is_bit_exact(tmp_path):
    model = build_wav2vec2(preset("small"))
    model.set_num_updates_(4321)
    back = from_hf(to_hf(model))
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and through save_pretrained directories that transformers itself loads offline
    from transformers import Wav2Vec2ForPreTraining

    save_hf(model, tmp_path / "hf")
    reloaded = Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert all(
        torch.equal(p, q) for p, q in zip(to_hf(model).state_dict().values(), reloaded.state_dict().values())
    )
    again = load_hf(tmp_path / "hf")
    for key, value in again.state_dict().items():
        assert torch.equal(value, a[key]), key
