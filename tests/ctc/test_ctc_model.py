"""CtcModel: shapes, masking, freezing, pretrained init, loss, save/load, and a tiny overfit run."""

from __future__ import annotations

import pytest
import torch
from ctc_toy import make_corpus, overfit, tiny_ctc_config

from speechvq.config import MaskConfig, wav2vec2_tiny
from speechvq.io import load_pretrained
from speechvq.losses_ctc import ctc_loss
from speechvq.models.ctc import (
    CtcConfig,
    build_ctc_model,
    ctc_config_from_wav2vec2,
    from_pretrained_wav2vec2,
    load_ctc_pretrained,
    normalize_waveforms,
    save_ctc_pretrained,
)
from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.text import Vocabulary


def test_ctc_model_returns_logits_and_frame_lengths(waves):
    x, lengths = waves
    model = build_ctc_model(tiny_ctc_config(12)).eval()
    out = model(x, lengths)
    assert out.logits.shape == (3, 49, 12)
    assert out.lengths.tolist() == model.output_lengths(lengths).tolist() == [49, 34, 21]
    assert out.time_mask is None


def test_ctc_model_padded_batch_equals_each_utterance_alone(waves):
    x, lengths = waves
    model = build_ctc_model(tiny_ctc_config(12, normalize_waveform=True)).eval()
    batch = model(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = model(x[i : i + 1, :n])
        frames = int(batch.lengths[i])
        torch.testing.assert_close(batch.logits[i, :frames], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_ctc_model_masks_time_and_channels_only_in_training(waves):
    x, lengths = waves
    mask = MaskConfig(mask_prob=0.5, mask_length=3, min_masks=1, channel_prob=0.3, channel_length=4)
    model = build_ctc_model(tiny_ctc_config(12, mask=mask))
    out = model.train()(x, lengths, generator=torch.Generator().manual_seed(0))
    assert out.time_mask is not None and bool(out.time_mask.any())
    padding = torch.arange(out.time_mask.size(1))[None, :] >= out.lengths[:, None]
    assert not bool((out.time_mask & padding).any())
    assert model.eval()(x, lengths).time_mask is None


def test_ctc_model_channel_mask_zeroes_the_masked_channels():
    model = build_ctc_model(tiny_ctc_config(12)).eval()
    x = torch.randn(1, 8000)
    seen = {}
    model.context.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    channel_mask = torch.zeros(1, 32, dtype=torch.bool)
    channel_mask[0, 5:9] = True
    model(x, channel_mask=channel_mask)
    assert bool((seen["x"][0, :, 5:9] == 0).all())
    assert bool((seen["x"][0, :, :5] != 0).any())


def test_normalize_waveforms_matches_transformers_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9000, generator=g) * 0.3 + 0.1, torch.randn(5000, generator=g) * 2.0
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor([a.numpy(), b.numpy()], sampling_rate=16000, padding=True, return_tensors="pt")
    x = torch.zeros(2, 9000)
    x[0], x[1, :5000] = a, b
    got = normalize_waveforms(x, torch.tensor([9000, 5000]))
    torch.testing.assert_close(got, expected["input_values"], atol=1e-5, rtol=1e-5)


def test_freezing_trains_only_the_output_layer_for_the_first_updates(corpus):
    freeze = 3
    model = build_ctc_model(tiny_ctc_config(len(corpus.vocab), freeze_updates=freeze))
    model.freeze_feature_encoder()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}

    def changed() -> set[str]:
        return {k for k, v in model.named_parameters() if not torch.equal(v, initial[k])}

    for update in range(freeze + 2):
        model.set_num_updates_(update)
        out = model.train()(corpus.waveforms, corpus.lengths)
        loss = model.compute_loss(out, corpus.targets, corpus.target_lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if update < freeze:
            assert model.body_frozen
            assert changed() == {"lm_head.weight", "lm_head.bias"}
    moved = changed()
    assert not model.body_frozen
    assert {"context.layers.0.attention.q_proj.weight", "feature_projection.linear.weight"} <= moved
    assert not any(k.startswith("feature_encoder.") for k in moved)


def test_from_pretrained_wav2vec2_copies_the_encoder_and_context():
    w2v = build_wav2vec2(wav2vec2_tiny())
    model = from_pretrained_wav2vec2(
        w2v, 9, freeze_updates=5, layer_drop_p=0.2, final_dropout_p=0.1, mask={"channel_prob": 0.5}
    )
    theirs = w2v.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("feature_encoder.", "feature_projection.", "context.", "mask_embedding")):
            assert torch.equal(value, theirs[key]), key
    assert model.lm_head.out_features == 9
    assert model.cfg.context.layer_drop_p == 0.2 and model.cfg.final_dropout_p == 0.1
    assert model.cfg.mask.channel_prob == 0.5 and model.cfg.mask.channel_length == 64  # fine-tuning default
    assert model.cfg.context.dim == w2v.cfg.context.dim and model.cfg.encoder.grad_mult == 0.0
    assert not any(p.requires_grad for p in model.feature_encoder.parameters())


def test_from_pretrained_wav2vec2_reinitialises_the_top_blocks():
    w2v = build_wav2vec2(wav2vec2_tiny())
    top = w2v.cfg.context.num_layers - 1
    with torch.no_grad():  # pretrained LayerNorms differ from a fresh one's ones and zeros
        for p in w2v.context.parameters():
            p.add_(0.5)
    other = build_wav2vec2(wav2vec2_tiny())
    torch.manual_seed(0)
    model = from_pretrained_wav2vec2(w2v, 9, reinit_layers=1)
    torch.manual_seed(0)
    fresh = from_pretrained_wav2vec2(other, 9, reinit_layers=1)
    theirs, fresh_sd = w2v.state_dict(), fresh.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(f"context.layers.{top}."):
            assert not torch.equal(value, theirs[key]), key
            assert torch.equal(value, fresh_sd[key]), key  # the fresh initialisation, not a copy
        elif key.startswith(("feature_projection.", "context.", "mask_embedding")):
            assert torch.equal(value, theirs[key]), key
    norm = model.context.layers[top].attention_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    with pytest.raises(ValueError, match="`reinit_layers` must be in"):
        from_pretrained_wav2vec2(w2v, 9, reinit_layers=top + 2)


def test_ctc_config_from_wav2vec2_raises_on_unknown_setting():
    with pytest.raises(TypeError, match="learning_rate"):
        ctc_config_from_wav2vec2(wav2vec2_tiny(), 9, learning_rate=1.0)


def test_ctc_config_raises_when_blank_is_outside_the_vocabulary():
    with pytest.raises(ValueError, match="`blank_id` must be in"):
        CtcConfig(vocab_size=5, blank_id=5)


def test_ctc_config_round_trips_through_dict():
    cfg = tiny_ctc_config(7, normalize_waveform=True)
    assert CtcConfig.from_dict(cfg.to_dict()) == cfg


def test_ctc_loss_is_fp32_sum_and_zero_for_impossible_alignments():
    logits = torch.randn(2, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([[1, 2, 0, 0, 0, 0], [1, 2, 3, 4, 1, 2]])
    loss_each = [
        ctc_loss(logits[i : i + 1], torch.tensor([4]), targets[i : i + 1], torch.tensor([n]))
        for i, n in enumerate([2, 6])
    ]
    total = ctc_loss(logits, torch.tensor([4, 4]), targets, torch.tensor([2, 6]))
    assert total.dtype == torch.float32
    assert float(loss_each[1].detach()) == 0.0  # 6 targets cannot fit into 4 frames: zero_infinity
    torch.testing.assert_close(total, loss_each[0] + loss_each[1])
    total.backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_ctc_loss_mean_divides_by_target_lengths():
    logits = torch.randn(2, 6, 5)
    targets = torch.tensor([[1, 2, 0], [1, 2, 3]])
    lengths, target_lengths = torch.tensor([6, 6]), torch.tensor([2, 3])
    each = [
        ctc_loss(logits[i : i + 1], lengths[:1], targets[i : i + 1], target_lengths[i : i + 1])
        for i in range(2)
    ]
    mean = ctc_loss(logits, lengths, targets, target_lengths, reduction="mean")
    torch.testing.assert_close(mean, (each[0] / 2 + each[1] / 3) / 2)
    with pytest.raises(ValueError, match="`reduction` must be"):
        ctc_loss(logits, lengths, targets, target_lengths, reduction="none")


def test_save_and_load_ctc_pretrained_round_trip(tmp_path, waves):
    x, lengths = waves
    vocab = Vocabulary.letters(["AB CD"])
    model = build_ctc_model(tiny_ctc_config(len(vocab))).eval()
    model.set_num_updates_(17)
    save_ctc_pretrained(model, vocab, tmp_path / "m")
    loaded, loaded_vocab = load_ctc_pretrained(tmp_path / "m")
    assert loaded_vocab.tokens == vocab.tokens
    assert int(loaded.num_updates) == 17
    torch.testing.assert_close(loaded(x, lengths).logits, model(x, lengths).logits)
    assert type(load_pretrained(tmp_path / "m")) is type(model)


def test_load_ctc_pretrained_rejects_a_pretraining_checkpoint(tmp_path):
    from speechvq.errors import UserInputError
    from speechvq.io import save_pretrained

    save_pretrained(build_wav2vec2(wav2vec2_tiny()), tmp_path / "w2v")
    with pytest.raises(UserInputError, match="not a CTC model"):
        load_ctc_pretrained(tmp_path / "w2v")


def test_ctc_model_overfits_synthetic_utterances_to_zero_cer_in_ci_time(trained):
    _, steps, error, seconds = trained
    assert error == 0.0, f"CER {error} after {steps} steps"
    assert seconds < 30.0


@pytest.mark.slow
def test_ctc_model_overfits_with_a_frozen_encoder_and_time_masking():
    corpus = make_corpus(["BA", "CD DA", "ABC"])
    torch.manual_seed(1)
    model = build_ctc_model(tiny_ctc_config(len(corpus.vocab), mask=MaskConfig(mask_prob=0.2, mask_length=2)))
    model.freeze_feature_encoder()
    steps, error = overfit(model, corpus, max_steps=300)
    assert error == 0.0, f"CER {error} after {steps} steps"


def test_pad_targets_batches_id_lists():
    from speechvq.losses_ctc import pad_targets

    targets, lengths = pad_targets([[5, 6, 7], [8], []])
    assert targets.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]
