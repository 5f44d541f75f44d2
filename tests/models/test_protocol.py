"""Every audio model implements the AudioModel protocol that unit export and transcription read."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechvq.config import preset, vq_wav2vec_gumbel
from speechvq.models.ctc import CtcConfig, build_ctc_model
from speechvq.models.protocol import TRANSFORMER_INPUT, AudioModel, QuantizingModel
from speechvq.models.vq_wav2vec import build_vq_wav2vec
from speechvq.models.wav2vec2 import build_wav2vec2


def _wav2vec2(kind):
    cfg = preset("tiny")
    cfg.encoder = dataclasses.replace(cfg.encoder, kind=kind)
    return build_wav2vec2(cfg)


def _vq(kind):
    cfg = vq_wav2vec_gumbel()
    cfg.encoder_kind = kind
    cfg.encoder_layers = tuple((32, k, s) for _, k, s in cfg.encoder_layers)
    cfg.aggregator_layers = tuple((32, k, s) for _, k, s in cfg.aggregator_layers[:2])
    cfg.quantizer.codevector_dim = 32
    return build_vq_wav2vec(cfg)


def _ctc(normalize):
    tiny = preset("tiny")
    return build_ctc_model(
        CtcConfig(encoder=tiny.encoder, context=tiny.context, normalize_waveform=normalize)
    )


MODELS = {
    "wav2vec2_conv": lambda: _wav2vec2("conv"),
    "wav2vec2_fbank": lambda: _wav2vec2("fbank"),
    "vq_wav2vec_conv": lambda: _vq("conv"),
    "vq_wav2vec_fbank": lambda: _vq("fbank"),
    "ctc": lambda: _ctc(False),
    "ctc_normalized": lambda: _ctc(True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_implements_the_audio_model_protocol(name):
    model = MODELS[name]().eval()
    assert isinstance(model, AudioModel)
    assert isinstance(model, QuantizingModel) == (not name.startswith("ctc"))
    x, lengths = torch.randn(2, 6000), torch.tensor([6000, 4000])
    frames = model.output_lengths(lengths)
    assert model.frame_stride > 0 and model.receptive_field <= 4000
    layers = [*range(model.num_layers + 1)] + ([TRANSFORMER_INPUT] if model.has_transformer else [])
    for layer in layers:
        feats, got = model.layer_features(x, lengths, layer)
        assert torch.equal(got, frames) and feats.shape[:2] == (2, int(frames.max()))
    with pytest.raises(ValueError, match="layer"):
        model.layer_features(x, lengths, model.num_layers + 1)
    if not model.has_transformer:
        with pytest.raises(ValueError, match="Transformer"):
            model.layer_features(x, lengths, TRANSFORMER_INPUT)


def test_waveform_norm_comes_from_the_config():
    assert not _wav2vec2("conv").waveform_norm.enabled
    large = preset("large")
    assert large.waveform_norm.enabled and large.waveform_norm.eps == 1e-5 and large.waveform_norm.by_caller
    ctc = _ctc(True).waveform_norm
    assert ctc.enabled and ctc.eps == 1e-7 and ctc.in_forward and not ctc.by_caller
    assert not _vq("conv").waveform_norm.enabled
