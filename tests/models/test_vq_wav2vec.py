"""vq-wav2vec: architecture, the wav2vec future-prediction objective, padding, short training."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from speechvq.config import (
    VQ_WAV2VEC_CONV_LAYERS,
    KMeansQuantizerConfig,
    QuantizerConfig,
    VqWav2VecConfig,
    vq_wav2vec_gumbel,
    vq_wav2vec_kmeans,
)
from speechvq.io import load_pretrained, save_pretrained
from speechvq.losses_wav2vec import (
    future_prediction_logits,
    future_prediction_loss,
    sample_future_distractors,
)
from speechvq.models.kmeans_quantizer import KMeansVectorQuantizer
from speechvq.models.quantizer import GumbelVectorQuantizer
from speechvq.models.vq_wav2vec import auto_offset, build_vq_wav2vec


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(quantizer_type: str = "gumbel", channels: int = 32) -> VqWav2VecConfig:
    return VqWav2VecConfig(
        encoder_layers=tuple((channels, k, s) for _, k, s in VQ_WAV2VEC_CONV_LAYERS),
        aggregator_layers=tuple((channels, k, 1) for k in range(2, 6)),
        quantizer_type=quantizer_type,  # type: ignore[arg-type]
        quantizer=QuantizerConfig(
            codebook_size=16,
            codevector_dim=channels,
            weight_proj_depth=2,
            weight_proj_factor=2,
            combine_groups=True,
        ),
        kmeans=KMeansQuantizerConfig(codebook_size=16, codevector_dim=channels),
        prediction_steps=4,
        num_negatives=5,
    )


def test_presets_have_the_paper_architecture() -> None:
    gumbel, kmeans = vq_wav2vec_gumbel(), vq_wav2vec_kmeans()
    assert len(gumbel.encoder_layers) == 8 and gumbel.encoder_layers[0] == (512, 10, 5)
    assert [k for _, k, _ in gumbel.aggregator_layers] == list(range(2, 14))
    assert gumbel.aggregator_skip_connections and gumbel.residual_scale == 0.5
    assert (gumbel.prediction_steps, gumbel.num_negatives) == (12, 10)
    assert gumbel.quantizer.combine_groups and gumbel.quantizer.weight_proj_depth == 2
    assert (kmeans.quantizer_type, kmeans.kmeans.gamma, kmeans.kmeans.loss_weight) == ("kmeans", 0.25, 1.0)
    model = build_vq_wav2vec(gumbel)
    # 10 ms frames (stride 160) with a 465-sample (~30 ms) receptive field; fairseq's offset "auto"
    assert model.feature_encoder.receptive_field == 465
    assert model.offset == auto_offset(gumbel.encoder_layers) == 3
    assert isinstance(model.quantizer, GumbelVectorQuantizer)
    assert isinstance(build_vq_wav2vec(_tiny("kmeans")).quantizer, KMeansVectorQuantizer)


def test_distractors_are_other_valid_frames_of_the_same_utterance() -> None:
    lengths = torch.tensor([20, 7])
    index = sample_future_distractors(lengths, 20, 10, torch.Generator().manual_seed(0))
    frames = torch.arange(20)[None, :, None]
    assert not bool((index == frames).any())
    valid = frames < lengths[:, None, None]
    assert bool((index < lengths[:, None, None])[valid.expand_as(index)].all())


def test_prediction_logits_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    batch, frames, steps, dim, k, offset = 2, 9, 3, 4, 2, 2
    predictions = torch.randn(batch, frames, steps, dim, generator=g)
    targets = torch.randn(batch, frames, dim, generator=g)
    lengths = torch.tensor([9, 6])
    index = sample_future_distractors(lengths, frames, k, g)
    logits = future_prediction_logits(predictions, targets, index, lengths, offset)
    rows = []
    for s in range(steps):
        for b in range(batch):
            for t in range(frames):
                target = t + offset + s
                if target >= int(lengths[b]):
                    continue
                pred = predictions[b, t, s]
                row = [pred @ targets[b, target]] + [pred @ targets[b, j] for j in index[b, target]]
                rows.append(torch.stack(row))
    torch.testing.assert_close(logits, torch.stack(rows))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits).index_fill_(1, torch.tensor([0]), 1.0), reduction="sum"
    )
    torch.testing.assert_close(future_prediction_loss(logits), bce)


@pytest.mark.parametrize("quantizer_type", ["gumbel", "kmeans"])
def test_padded_batch_matches_each_utterance_alone(quantizer_type: str) -> None:
    model = build_vq_wav2vec(_tiny(quantizer_type)).eval()
    g = torch.Generator().manual_seed(3)
    long, short = torch.randn(1, 6400, generator=g), torch.randn(1, 4000, generator=g)
    batch = torch.cat([long, torch.nn.functional.pad(short, (0, 2400))])
    with torch.no_grad():
        full = model(batch, torch.tensor([6400, 4000]), generator=torch.Generator().manual_seed(0))
        alone = model(short, distractor_index=full.distractor_index[1:, :23])
    n = int(full.lengths[1])
    assert n == alone.features.size(1) == 23
    torch.testing.assert_close(full.features[1, :n], alone.features[0], atol=1e-5, rtol=0)
    assert torch.equal(full.quantizer.codes[1, :n], alone.quantizer.codes[0])
    torch.testing.assert_close(full.context[1, :n], alone.context[0], atol=1e-5, rtol=0)
    # every (frame, step) target of the short utterance is scored, and only those
    per_step = [max(n - model.offset - s, 0) for s in range(model.cfg.prediction_steps)]
    assert alone.num_targets == sum(per_step)


@pytest.mark.parametrize("quantizer_type", ["gumbel", "kmeans"])
def test_short_training_run_lowers_the_loss_and_reports_code_usage(quantizer_type: str) -> None:
    torch.manual_seed(0)
    model = build_vq_wav2vec(_tiny(quantizer_type, channels=16))
    g = torch.Generator().manual_seed(1)
    t = torch.arange(3200) / 16000
    waves = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (220.0, 440.0)])
    waves = waves + 0.1 * torch.randn(2, 3200, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            out = model.eval()(waves, generator=torch.Generator().manual_seed(123))
            loss = model.compute_loss(out)
        return float(loss.contrastive) / loss.num_targets

    before = eval_loss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(20):
        model.set_num_updates_(step)
        out = model(waves, generator=torch.Generator().manual_seed(step))
        loss = model.compute_loss(out)
        optimizer.zero_grad()
        (loss.total / loss.num_targets).backward()
        optimizer.step()
        usage = float(out.quantizer.code_perplexity)
        assert 1.0 <= usage <= 2 * 16  # code usage, as a perplexity summed over the G groups
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_kmeans_objective_adds_weighted_quantizer_loss() -> None:
    model = build_vq_wav2vec(_tiny("kmeans"))
    out = model(torch.randn(2, 6400), generator=torch.Generator().manual_seed(0))
    loss = model.compute_loss(out)
    torch.testing.assert_close(loss.diversity, out.num_targets * out.quantizer.loss)
    torch.testing.assert_close(loss.total, loss.contrastive + loss.diversity)


def test_save_and_load_pretrained_round_trip(tmp_path: Path) -> None:
    model = build_vq_wav2vec(_tiny("kmeans"))
    save_pretrained(model, tmp_path / "vq")
    back = load_pretrained(tmp_path / "vq")
    assert back.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="`quantizer_type` must be"):
        VqWav2VecConfig(quantizer_type="rvq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`prediction_steps` must be >= 1"):
        VqWav2VecConfig(prediction_steps=0)
    with pytest.raises(ValueError, match="aggregator strides must be 1"):
        build_vq_wav2vec(VqWav2VecConfig(aggregator_layers=((512, 2, 2),)))


def test_ema_codebook_resists_the_collapse_of_plain_kmeans() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.arange(3200) / 16000
    waves = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (220.0, 440.0, 330.0, 550.0)])
    waves = waves * torch.linspace(0, 1, 3200) + 0.1 * torch.randn(4, 3200, generator=g)
    results = {}
    for name, ema_decay in (("plain", None), ("ema", 0.9)):
        torch.manual_seed(0)
        cfg = _tiny("kmeans", channels=16)
        cfg.kmeans = KMeansQuantizerConfig(codebook_size=16, codevector_dim=16, ema_decay=ema_decay)
        model = build_vq_wav2vec(cfg).train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        usage, bce = [], []
        for step in range(40):
            out = model(waves, generator=torch.Generator().manual_seed(step))
            loss = model.compute_loss(out)
            optimizer.zero_grad()
            (loss.total / loss.num_targets).backward()
            optimizer.step()
            usage.append(float(out.quantizer.code_perplexity))
            bce.append(float(loss.contrastive.detach()) / loss.num_targets)
        results[name] = (sum(usage[-20:]) / 20, sum(bce[-5:]) / 5)
    # BCE when every target looks alike (1 true frame vs 5 distractors): ln 6 + 5 ln(6/5)
    collapse_floor = math.log(6) + 5 * math.log(6 / 5)
    assert results["ema"][0] > results["plain"][0] + 1.0, results
    assert results["ema"][1] < collapse_floor - 0.2 < results["plain"][1], results
