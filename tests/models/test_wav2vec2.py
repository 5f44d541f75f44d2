"""Invariants of the wav2vec 2.0 model: padding, lengths, masks, distractors, training."""

from __future__ import annotations

import math

import pytest
import torch

from speechvq import build_wav2vec2, preset
from speechvq.config import FeatureEncoderConfig, Wav2Vec2Config
from speechvq.models.encoder import build_feature_encoder, conv_output_lengths


def _eval_model(name: str = "tiny", norm_mode: str = "group_norm"):
    cfg = preset(name)
    cfg.encoder = FeatureEncoderConfig(conv_layers=cfg.encoder.conv_layers, norm_mode=norm_mode)
    return build_wav2vec2(cfg).eval()


@pytest.mark.parametrize("norm_mode", ["group_norm", "layer_norm"])
@torch.no_grad()
def test_padded_batch_equals_each_utterance_alone(waves, norm_mode):
    model = _eval_model("tiny", norm_mode)
    x, lengths = waves
    batch_layers, frame_lengths = model.extract_features(x, lengths)
    codes, _ = model.quantize(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone_layers, alone_len = model.extract_features(x[i : i + 1, :n])
        t = int(frame_lengths[i])
        assert t == int(alone_len[0]) == alone_layers[-1].size(1)
        for batched, alone in zip(batch_layers, alone_layers):
            torch.testing.assert_close(batched[i, :t], alone[0], atol=1e-5, rtol=1e-5)
        alone_codes, _ = model.quantize(x[i : i + 1, :n])
        assert torch.equal(codes.codes[i, :t], alone_codes.codes[0])


def test_output_lengths_equal_frames_produced_and_transformers_formula():
    model = _eval_model()
    for n in [400, 401, 719, 720, 16000, 16001, 33333]:
        feats, lengths = model.feature_encoder(torch.randn(1, n))
        assert (
            feats.size(1)
            == int(lengths[0])
            == int(model.feature_encoder.output_lengths(torch.tensor([n]))[0])
        )
    # transformers' _get_feat_extract_output_lengths for the BASE conv stack
    from transformers import Wav2Vec2Config as HFConfig
    from transformers import Wav2Vec2Model as HFModel

    hf = HFModel(HFConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32))
    samples = torch.tensor([400, 1000, 16000, 250000])
    ours = conv_output_lengths(samples, Wav2Vec2Config().encoder.conv_layers)
    assert torch.equal(ours, hf._get_feat_extract_output_lengths(samples))


def test_input_shorter_than_one_frame_raises_value_error():
    model = _eval_model()
    with pytest.raises(ValueError, match="at least 400 samples"):
        model(torch.randn(1, 399))
    with pytest.raises(ValueError, match="at least 400 samples"):
        model(torch.randn(2, 16000), torch.tensor([16000, 100]))
    with pytest.raises(ValueError, match="must be 2-D"):
        model(torch.randn(16000))


def test_masks_and_distractors_never_touch_padding_and_never_the_positive(waves):
    model = build_wav2vec2(preset("tiny")).train()
    x, lengths = waves
    for seed in range(5):
        out = model(x, lengths, generator=torch.Generator().manual_seed(seed))
        _batch, frames = out.mask.shape
        valid = torch.arange(frames)[None, :] < out.lengths[:, None]
        assert not (out.mask & ~valid).any()
        flat_mask = out.mask.reshape(-1)
        assert flat_mask[out.distractor_index].all()  # only masked (hence valid) frames
        assert (out.distractor_index != out.target_index[:, None]).all()
        same_utt = out.distractor_index // frames == out.target_index[:, None] // frames
        assert same_utt.all()
        assert out.logits.shape == (int(out.mask.sum()), model.cfg.loss.num_negatives + 1)


def test_feature_grad_mult_scales_and_freezes_the_encoder():
    torch.manual_seed(0)
    x = torch.randn(2, 8000)
    grads = {}
    for mult in (1.0, 0.1, 0.0):
        cfg = preset("tiny")
        cfg.encoder.grad_mult = mult
        cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.feature_dropout_p = 0.0
        torch.manual_seed(1)
        model = build_wav2vec2(cfg)
        out = model(x, generator=torch.Generator().manual_seed(0))
        model.compute_loss(out).contrastive.backward()
        grads[mult] = model.feature_encoder.layers[0].conv.weight.grad
    assert grads[0.0] is None
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-3, atol=1e-6)


def test_extract_features_num_layers_returns_the_first_layers():
    cfg = preset("tiny")
    model = build_wav2vec2(cfg).eval()
    x = torch.randn(1, 8000)
    every, _ = model.extract_features(x)
    first, _ = model.extract_features(x, num_layers=1)
    assert len(every) == cfg.context.num_layers and len(first) == 1
    torch.testing.assert_close(first[0], every[0])


def test_tiny_training_run_lowers_the_loss_with_finite_gradients():
    torch.manual_seed(0)
    model = build_wav2vec2(preset("tiny")).train()
    g = torch.Generator().manual_seed(0)
    # generated "speech": a few harmonic tones with varying pitch and noise, fixed set of clips
    t = torch.arange(16000) / 16000.0
    clips = []
    for i in range(4):
        f0 = 110.0 + 40.0 * i
        wave = sum(
            torch.sin(2 * torch.pi * f0 * k * t * (1 + 0.1 * torch.sin(2 * torch.pi * 3 * t))) / k
            for k in (1, 2, 3)
        )
        clips.append(wave + 0.05 * torch.randn(16000, generator=g))
    x = torch.stack(clips)
    optim = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        model.set_num_updates_(step)
        out = model(x, generator=torch.Generator().manual_seed(step))
        loss = model.compute_loss(out)
        optim.zero_grad()
        (loss.total / loss.num_targets).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optim.step()
        losses.append(float(loss.contrastive.detach()) / loss.num_targets)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    chance = math.log(model.cfg.loss.num_negatives + 1)  # uniform over target + K distractors
    assert last < first - 0.2
    assert last < chance  # better than guessing


def _per_utterance(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_per_utterance_generators_make_an_utterance_independent_of_its_batch(waves):
    # training mode with dropout off: the mask, distractors and Gumbel noise of utterance i come
    # from generator i only, so i alone and i in a padded batch get the same logits
    cfg = preset("tiny")
    cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.feature_dropout_p = 0.0
    torch.manual_seed(0)
    model = build_wav2vec2(cfg).train()
    x, lengths = waves
    seeds = [11, 22, 33][: x.size(0)]
    with torch.no_grad():
        batched = model(x, lengths, generator=_per_utterance(seeds))
        counts = batched.mask.sum(dim=1).tolist()
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        for i, n in enumerate(lengths.tolist()):
            alone = model(x[i : i + 1, :n], generator=_per_utterance([seeds[i]]))
            t = int(batched.lengths[i])
            assert torch.equal(batched.mask[i, :t], alone.mask[0])
            assert torch.equal(batched.quantizer.codes[i, :t], alone.quantizer.codes[0])
            rows = slice(offsets[i], offsets[i] + counts[i])
            torch.testing.assert_close(batched.logits[rows], alone.logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(
                batched.distractor_index[rows] - i * batched.mask.size(1), alone.distractor_index
            )
        # a different generator for one utterance changes that utterance's mask only
        other = model(x, lengths, generator=_per_utterance([99, *seeds[1:]]))
        assert not torch.equal(other.mask[0], batched.mask[0])
        assert torch.equal(other.mask[1:], batched.mask[1:])


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_masked_only_gives_the_same_loss_and_gradients(waves, layer_norm_first):
    # what the trainer runs: the last block at the masked frames only; training mode with dropout
    # off, the same per-utterance generators (mask, distractors, Gumbel noise)
    cfg = preset("tiny")
    cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.feature_dropout_p = 0.0
    cfg.context.layer_norm_first = layer_norm_first
    torch.manual_seed(0)
    model = build_wav2vec2(cfg).train()
    x, lengths = waves

    def run(masked_only):
        model.zero_grad()
        out = model(x, lengths, generator=_per_utterance([5, 6, 7]), masked_only=masked_only)
        loss = model.compute_loss(out)
        loss.total.backward()
        return out, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_loss, full_grads = run(False)
    part, part_loss, part_grads = run(True)
    assert torch.equal(part.mask, full.mask) and part.context is None
    assert full.context.shape == (*full.mask.shape, cfg.context.dim)
    assert part.masked_context.shape == full.masked_context.shape == (part.num_targets, cfg.context.dim)
    torch.testing.assert_close(
        full.masked_context, full.context.reshape(-1, cfg.context.dim)[full.target_index]
    )
    torch.testing.assert_close(part.masked_context, full.masked_context)
    torch.testing.assert_close(part.logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part_loss.total, full_loss.total, atol=1e-5, rtol=1e-5)
    assert part_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(part_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cross_process_sum_identity_leaves_the_loss_unchanged(waves):
    # with one process the cross-process sum is the identity: the same loss as without it
    cfg = preset("tiny")
    cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.feature_dropout_p = 0.0
    torch.manual_seed(0)
    model = build_wav2vec2(cfg).train()
    x, lengths = waves
    seeds = list(range(x.size(0)))
    plain = model.compute_loss(model(x, lengths, generator=_per_utterance(seeds)))
    model.set_cross_process_sum_(lambda t: t * 1.0)
    summed = model.compute_loss(model(x, lengths, generator=_per_utterance(seeds)))
    for name in ("contrastive", "diversity", "feature_penalty"):
        torch.testing.assert_close(getattr(summed, name), getattr(plain, name))
    # a sum over two identical "processes" doubles numerator and count alike: still the same means
    model.set_cross_process_sum_(lambda t: t * 2.0)
    doubled = model.compute_loss(model(x, lengths, generator=_per_utterance(seeds)))
    torch.testing.assert_close(doubled.feature_penalty, plain.feature_penalty)
    torch.testing.assert_close(doubled.diversity, plain.diversity)


@pytest.mark.parametrize("batch", [3, 1])
@pytest.mark.parametrize(("kernel", "stride"), [(10, 5), (3, 2), (2, 2), (4, 1), (8, 4), (2, 3), (24, 12)])
def test_conv_block_matches_conv1d_in_output_and_gradients(kernel, stride, batch):
    # the encoder's im2col matmul (kernel-major columns, custom backward) is nn.Conv1d; so is the
    # window-blocks matmul that one utterance on the CPU takes when k <= 2 s (batch 1)
    from speechvq.models.kernels.feature_encoder import FastConvLayerBlock as ConvLayerBlock

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 5, kernel, stride=stride, bias=True)
    block = ConvLayerBlock(conv, None)
    x = torch.randn(batch, 41, 6, requires_grad=True)
    out, _ = block(x, None)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.gelu(conv(ref_x.transpose(1, 2))).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], upstream)
    ref_grads = torch.autograd.grad(ref, [ref_x, conv.weight, conv.bias], upstream)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_block_of_one_utterance_runs_under_cpu_autocast(dtype):
    # the window-blocks matmuls are fp32 only; under fp16/bf16 autocast the layer takes the
    # autocast paths (an earlier layer hands it half-precision input)
    from speechvq.models.kernels.feature_encoder import FastConvLayerBlock as ConvLayerBlock

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 16, 3, stride=2, bias=True)
    x = torch.randn(1, 41, 32)
    with torch.autocast("cpu", dtype=dtype):
        out, _ = ConvLayerBlock(conv, None)(x.to(dtype), None)
    ref = torch.nn.functional.gelu(conv(x.transpose(1, 2))).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(("kernel", "stride"), [(3, 2), (2, 2), (8, 4), (2, 3), (1, 1)])
@pytest.mark.parametrize("samples", [50, 51, 53])
def test_window_blocks_conv_gradients_pass_gradcheck(kernel, stride, samples):
    # float64 finite differences of the custom backward, including windows that share frames
    # (k > s), gaps between windows (k < s) and samples left over after the last window
    from speechvq.models.kernels.conv import WindowBlocksConv

    torch.manual_seed(0)
    x = torch.randn(samples, 7, dtype=torch.float64, requires_grad=True)
    split = min(kernel, stride) * 7  # the weight's columns for the first view, the rest for the second
    weight_a = torch.randn(5, split, dtype=torch.float64, requires_grad=True)
    weight_b = (
        torch.randn(5, kernel * 7 - split, dtype=torch.float64, requires_grad=True)
        if kernel > stride
        else None
    )
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    inputs = tuple(t for t in (x, weight_a, weight_b, bias) if t is not None)

    def conv(*args):
        x, weight_a, *rest = args
        weight_b = rest[0] if kernel > stride else None
        return WindowBlocksConv.apply(x, weight_a, weight_b, rest[-1], kernel, stride)

    assert torch.autograd.gradcheck(conv, inputs)


def _first_layer_with_group_norm(channels: int = 16, bias: bool = False):
    from speechvq.models.encoder import MaskedGroupNorm
    from speechvq.models.kernels.feature_encoder import FastConvLayerBlock as ConvLayerBlock

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(1, channels, 10, stride=5, bias=bias)
    norm = MaskedGroupNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    ref_norm = torch.nn.GroupNorm(channels, channels)
    with torch.no_grad():
        ref_norm.weight.copy_(norm.weight)
        ref_norm.bias.copy_(norm.bias)
    return ConvLayerBlock(conv, norm), conv, ref_norm


@pytest.mark.parametrize("bias", [False, True])
def test_first_layer_group_norm_from_window_moments_matches_conv1d_group_norm(bias):
    # the first layer's GroupNorm statistics come from the 10 x 10 moments of the waveform windows
    # (linear_output_moments); output and all gradients equal nn.Conv1d + nn.GroupNorm
    block, conv, ref_norm = _first_layer_with_group_norm(bias=bias)
    norm = block.norm
    wave = torch.randn(3, 803) * 0.3 + 0.05  # a DC offset, so the centring matters
    x = wave[:, :, None].requires_grad_(True)
    out, _ = block(x, None)
    ref_x = wave[:, None, :].clone().requires_grad_(True)
    ref = torch.nn.functional.gelu(ref_norm(conv(ref_x))).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, conv.weight, norm.weight, norm.bias], upstream, retain_graph=True)
    ref_grads = torch.autograd.grad(
        ref, [ref_x, conv.weight, ref_norm.weight, ref_norm.bias], upstream, retain_graph=True
    )
    torch.testing.assert_close(grads[0][:, :, 0], ref_grads[0][:, 0, :], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if bias:  # the norm removes a conv bias: its gradient is zero up to rounding in both
        (got,) = torch.autograd.grad(out, [conv.bias], upstream)
        (want,) = torch.autograd.grad(ref, [conv.bias], upstream)
        assert float(got.abs().max()) < 1e-3 and float(want.abs().max()) < 1e-3


def test_first_layer_folded_group_norm_of_a_padded_batch_equals_each_utterance_alone():
    # the norm is folded into one weight per utterance, from that utterance's valid frames: the
    # valid frames and the gradients equal Conv1d + GroupNorm run on each utterance by itself
    block, conv, ref_norm = _first_layer_with_group_norm(bias=True)
    samples = [803, 611, 402]
    wave = torch.zeros(3, 803)
    for b, n in enumerate(samples):
        wave[b, :n] = torch.randn(n) * 0.3 + 0.1 * b
    out, frames = block(wave[:, :, None], torch.tensor(samples))
    assert frames.tolist() == [159, 121, 79]
    valid = torch.arange(out.size(1))[None, :, None] < frames[:, None, None]
    upstream = torch.randn_like(out) * valid
    grads = torch.autograd.grad(out, [conv.weight, conv.bias, block.norm.weight, block.norm.bias], upstream)
    want_grads = [torch.zeros_like(g) for g in grads]
    for b, (n, t) in enumerate(zip(samples, frames.tolist())):
        ref = torch.nn.functional.gelu(ref_norm(conv(wave[b : b + 1, None, :n]))).transpose(1, 2)
        torch.testing.assert_close(out[b : b + 1, :t], ref, atol=1e-5, rtol=1e-5)
        ref_params = [conv.weight, conv.bias, ref_norm.weight, ref_norm.bias]
        for acc, g in zip(want_grads, torch.autograd.grad(ref, ref_params, upstream[b : b + 1, :t])):
            acc += g
    for got, want in zip(grads[:1] + grads[2:], want_grads[:1] + want_grads[2:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the norm removes a conv bias: its gradient is zero up to rounding in both
    assert float(grads[1].abs().max()) < 1e-3 and float(want_grads[1].abs().max()) < 1e-3


def test_first_layer_folded_group_norm_under_bf16_autocast_stays_near_fp32():
    # the norm's scale multiplies the fp32 weight before the single rounding to bf16
    block, conv, _ = _first_layer_with_group_norm(channels=64)
    wave = torch.randn(2, 4001, 1) * 0.3
    upstream = torch.randn(2, 799, 64)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out, _ = block(wave, None)
        assert out.dtype == (torch.bfloat16 if enabled else torch.float32)
        grads = torch.autograd.grad(out.float(), [conv.weight, block.norm.weight, block.norm.bias], upstream)
        results.append((out.float(), grads))
    (want, want_grads), (got, got_grads) = results
    assert float((got - want).norm() / want.norm()) < 6e-3
    for g, w in zip(got_grads, want_grads):
        assert float((g - w).norm() / w.norm()) < 1e-2


def test_window_moments_equal_output_statistics_per_utterance_with_padding():
    from speechvq.models.kernels.conv import KernelMajorColumns
    from speechvq.models.kernels.feature_encoder import linear_output_moments

    torch.manual_seed(0)
    cols = KernelMajorColumns.apply(torch.randn(3, 500, 1) + 0.2, 10, 5)  # (3, 99, 10)
    weight, bias = torch.randn(8, 10), torch.randn(8)
    lengths = torch.tensor([99, 60, 31])
    var, mean = linear_output_moments(cols, weight, bias, lengths)
    y = cols @ weight.t() + bias
    for b, n in enumerate(lengths.tolist()):
        want_var, want_mean = torch.var_mean(y[b, :n], dim=0, unbiased=False)
        torch.testing.assert_close(var[b, 0], want_var, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mean[b, 0], want_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("c_in", "kernel", "stride"), [(1, 10, 5), (32, 3, 2), (32, 2, 2)])
def test_conv_block_in_bf16_autocast_matches_conv1d(c_in, kernel, stride):
    # in bf16 on the CPU the k = 3 / 2 layers run oneDNN's channels-last conv, the first the im2col
    # matmul; both equal nn.Conv1d under the same autocast to bf16 rounding, gradients included
    from speechvq.models.kernels.feature_encoder import FastConvLayerBlock as ConvLayerBlock

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(c_in, 48, kernel, stride=stride, bias=True)
    block = ConvLayerBlock(conv, None)
    x = torch.randn(2, 301, c_in, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = block(x, None)
        ref = torch.nn.functional.gelu(conv(ref_x.transpose(1, 2))).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    upstream = torch.randn(out.shape)
    grads = torch.autograd.grad(out.float(), [x, conv.weight, conv.bias], upstream)
    ref_grads = torch.autograd.grad(ref.float(), [ref_x, conv.weight, conv.bias], upstream)
    for got, want in zip(grads, ref_grads):
        assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("norm_mode", ["group_norm", "layer_norm"])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(waves, norm_mode):
    # training mode with every dropout on: the recomputed blocks replay their dropout draws
    def run(checkpointing: bool):
        cfg = preset("tiny")
        cfg.encoder = FeatureEncoderConfig(
            conv_layers=cfg.encoder.conv_layers, norm_mode=norm_mode, checkpoint_activations=checkpointing
        )
        cfg.context.checkpoint_activations = checkpointing
        cfg.context.dropout_p = cfg.context.attention_dropout_p = cfg.context.activation_dropout_p = 0.2
        torch.manual_seed(0)
        model = build_wav2vec2(cfg).train()
        x, lengths = waves
        torch.manual_seed(5)
        loss = model.compute_loss(model(x, lengths, generator=_per_utterance([1, 2, 3][: x.size(0)])))
        loss.total.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.total.detach(), grads

    plain_loss, plain_grads = run(False)
    ckpt_loss, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("norm_mode", ["group_norm", "layer_norm"])
@pytest.mark.parametrize("sample_lengths", [(4000, 3100, 2500), (4000, 4000, 4000)])
def test_cpu_encoder_runs_per_utterance_with_the_batched_result(norm_mode, sample_lengths):
    # on the CPU a batch is convolved one utterance at a time (no padding computed): the valid
    # frames and the weight gradients equal the batched run's, the padded frames are zeros
    torch.manual_seed(0)
    encoder = _eval_model("tiny", norm_mode).feature_encoder.train()
    lengths = torch.tensor(sample_lengths)
    x = torch.randn(3, 4000)
    x[torch.arange(4000)[None, :] >= lengths[:, None]] = 0.0
    features, frame_lengths = encoder(x, lengths)
    batched, batched_lengths = encoder._layers(x[:, :, None], lengths)
    assert torch.equal(frame_lengths, batched_lengths) and features.shape == batched.shape
    valid = torch.arange(features.size(1))[None, :] < frame_lengths[:, None]
    torch.testing.assert_close(features[valid], batched[valid], atol=1e-5, rtol=1e-5)
    assert not features[~valid].any()
    weight = torch.randn(features.shape[-1])
    params = [p for p in encoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad((features[valid] * weight).sum(), params)
    ref_grads = torch.autograd.grad((batched[valid] * weight).sum(), params)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_encoder_kernels_cast_once_per_batch_equal_autocast_per_utterance(
    monkeypatch, conv_bias, checkpointing
):
    # on the CPU a batch is convolved one utterance at a time; in bf16 each layer's kernel is cast
    # once for all of them (PrecastKernelConv). The features and the fp32 weight gradients equal
    # autocast's cast per utterance bit for bit: the same bf16 products, summed in fp32 alike.
    # A conv bias is a leaf, which autocast casts once and whose utterances' gradients it sums in
    # bf16; here they are summed in fp32, so they agree to bf16 rounding only
    from speechvq.models.kernels.feature_encoder import FastConvLayerBlock as ConvLayerBlock

    cfg = FeatureEncoderConfig(
        conv_layers=((32, 10, 5), (48, 3, 2), (48, 3, 2), (32, 2, 2)),
        conv_bias=conv_bias,
        checkpoint_activations=checkpointing,
    )
    torch.manual_seed(0)
    encoder = build_feature_encoder(cfg).train()
    lengths = torch.tensor([4000, 3100, 2300])
    waves = torch.randn(3, 4000) * 0.3
    upstream = torch.randn(3, 99, 32)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, frames = encoder(waves, lengths)
        valid = torch.arange(features.size(1))[None, :, None] < frames[:, None, None]
        grads = torch.autograd.grad(features.float(), list(encoder.parameters()), upstream * valid)
        return features, grads

    precast, precast_grads = run()
    monkeypatch.setattr(ConvLayerBlock, "precast_kernel", lambda self: None)  # autocast's casts
    cast, cast_grads = run()
    assert precast.dtype == torch.bfloat16 and torch.equal(precast, cast)
    for (name, _), got, want in zip(encoder.named_parameters(), precast_grads, cast_grads):
        assert got.dtype == torch.float32
        if name.endswith("conv.bias") and name != "layers.0.conv.bias":
            assert float((got - want).norm() / want.norm()) < 1e-2
        else:
            assert torch.equal(got, want), name
