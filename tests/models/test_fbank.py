"""The log-mel front end: transformers' spectrogram math, per-utterance normalisation, lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechvq import build_wav2vec2, preset
from speechvq.config import FeatureEncoderConfig
from speechvq.errors import UserInputError
from speechvq.models.fbank import FbankFeatureEncoder


def _speechlike(seconds: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 40 * torch.sin(2 * torch.pi * 1.5 * t)
    voiced = torch.sin(2 * torch.pi * torch.cumsum(f0, 0) / 16000) * (1 + torch.sin(2 * torch.pi * 3 * t))
    return (0.1 * voiced + 0.01 * torch.randn(t.numel(), generator=g)).float()


def test_log_mel_equals_transformers_spectrogram() -> None:
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    enc = FbankFeatureEncoder()
    wave = _speechlike(1.3, 0)
    ours = enc.log_mel(wave[None])[0].numpy()
    filters = mel_filter_bank(
        num_frequency_bins=257, num_mel_filters=80, min_frequency=20.0, max_frequency=8000.0,
        sampling_rate=16000, norm=None, mel_scale="htk",
    )  # fmt: skip
    ref = spectrogram(
        wave.numpy().astype(np.float64),
        window_function(400, "hann", periodic=True),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        mel_filters=filters,
        mel_floor=1e-10,
        log_mel="log",
        dtype=np.float64,
    ).T  # fmt: skip  (M, N) -> (N, M)
    assert ours.shape == ref.shape == (1 + (wave.numel() - 400) // 160, 80)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-3)


def test_padded_batch_equals_each_utterance_alone_and_lengths_match() -> None:
    enc = FbankFeatureEncoder()
    waves = [_speechlike(s, i) for i, s in enumerate((1.0, 0.61, 0.83))]
    lengths = torch.tensor([w.numel() for w in waves])
    batch = torch.zeros(3, int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : w.numel()] = w
    feats, frames = enc(batch, lengths)
    assert feats.shape[-1] == enc.out_channels == 160
    for i, w in enumerate(waves):
        alone, n = enc(w[None])
        assert int(frames[i]) == int(n[0]) == alone.size(1) == int(enc.output_lengths(lengths[i : i + 1])[0])
        torch.testing.assert_close(feats[i, : int(n[0])], alone[0], atol=1e-4, rtol=1e-4)
        assert feats[i, int(n[0]) :].abs().max() == 0 if int(n[0]) < feats.size(1) else True
    # normalised per utterance: zero mean, unit variance per mel channel over the valid 10 ms frames
    alone, _ = enc(waves[0][None])
    per_mel = alone[0].reshape(-1, 80)
    torch.testing.assert_close(per_mel.mean(0), torch.zeros(80), atol=0.05, rtol=0)
    # 20 ms frames, and the stacking keeps time order: frame t holds 10 ms frames 2t and 2t + 1
    assert enc.frame_stride == 320
    mel = enc.log_mel(waves[0][None])[0]
    mel = (mel - mel.mean(0)) / (mel.var(0, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(alone[0, 3, 80:], mel[7], atol=1e-4, rtol=1e-4)


def test_too_short_input_names_the_minimum() -> None:
    with pytest.raises(ValueError, match="560"):
        FbankFeatureEncoder()(torch.zeros(1, 500))


def test_wav2vec2_with_fbank_front_end_trains_and_refuses_reference_formats() -> None:
    cfg = preset("tiny")
    cfg.encoder = FeatureEncoderConfig(kind="fbank")
    torch.manual_seed(0)
    model = build_wav2vec2(cfg).train()
    assert sum(p.numel() for p in model.feature_encoder.parameters()) == 0
    waves = torch.stack([_speechlike(1.0, 1), _speechlike(1.0, 2)])
    out = model(waves, generator=torch.Generator().manual_seed(0))
    assert out.features.shape == (2, 49, 160) and out.lengths.tolist() == [49, 49]
    loss = model.compute_loss(out)
    loss.total.backward()
    assert model.feature_projection.linear.weight.grad.abs().sum() > 0
    from speechvq.interop.fairseq import speechvq_to_fairseq
    from speechvq.interop.hf import to_hf

    with pytest.raises(UserInputError, match=r"encoder\.kind"):
        to_hf(model)
    with pytest.raises(UserInputError, match=r"encoder\.kind"):
        speechvq_to_fairseq(model)
