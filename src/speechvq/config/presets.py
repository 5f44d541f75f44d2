"""wav2vec 2.0 presets, written as deltas of :func:`wav2vec2_base`."""

from __future__ import annotations

from speechvq.config.model import (
    BASE_CONV_LAYERS,
    ContextConfig,
    FeatureEncoderConfig,
    LossConfig,
    MaskConfig,
    QuantizerConfig,
    Wav2Vec2Config,
)


def finetune_mask() -> MaskConfig:
    """Fine-tuning's masking (fairseq's ``base_10m``/``base_1h``): time spans as in pretraining,
    plus channel masking (spans of 64 channels with probability 0.25)."""
    return MaskConfig(mask_prob=0.65, mask_length=10, min_masks=2, channel_prob=0.25, channel_length=64)


def wav2vec2_base() -> Wav2Vec2Config:
    """BASE (paper section 4.2): 12 x 768 post-LN Transformer, ~95M parameters."""
    return Wav2Vec2Config()


def wav2vec2_large() -> Wav2Vec2Config:
    """LARGE (paper section 4.2; fairseq ``wav2vec2_large_librivox``): 24 x 1024 pre-LN, ~317M."""
    cfg = wav2vec2_base()
    cfg.encoder = FeatureEncoderConfig(norm_mode="layer_norm", conv_bias=True)
    cfg.context = ContextConfig(
        dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, layer_norm_first=True, layer_drop_p=0.2
    )
    cfg.quantizer = QuantizerConfig(codevector_dim=768, temperature=(2.0, 0.1, 0.999995))
    cfg.final_dim = 768
    cfg.loss = LossConfig(feature_penalty_weight=0.0)
    return cfg


def wav2vec2_small() -> Wav2Vec2Config:
    """SMALL, for CPU training: conv 256 channels, 4 x 256 Transformer (~4M parameters)."""
    cfg = wav2vec2_base()
    cfg.encoder = FeatureEncoderConfig(conv_layers=tuple((256, k, s) for _, k, s in BASE_CONV_LAYERS))
    cfg.context = ContextConfig(
        dim=256, num_layers=4, num_heads=4, ffn_dim=1024, pos_conv_kernel=64, layer_drop_p=0.0
    )
    cfg.quantizer = QuantizerConfig(codebook_size=160, codevector_dim=128)
    cfg.final_dim = 128
    return cfg


def wav2vec2_tiny() -> Wav2Vec2Config:
    """TINY, for fast tests: conv 32 channels, 2 x 32 Transformer."""
    cfg = wav2vec2_base()
    cfg.encoder = FeatureEncoderConfig(conv_layers=tuple((32, k, s) for _, k, s in BASE_CONV_LAYERS))
    cfg.context = ContextConfig(
        dim=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        layer_drop_p=0.0,
    )
    cfg.quantizer = QuantizerConfig(codebook_size=16, codevector_dim=16)
    cfg.mask = MaskConfig(mask_prob=0.65, mask_length=4)
    cfg.loss = LossConfig(num_negatives=10)
    cfg.final_dim = 16
    return cfg


PRESETS = {
    "tiny": wav2vec2_tiny,
    "small": wav2vec2_small,
    "base": wav2vec2_base,
    "large": wav2vec2_large,
}


def preset(name: str) -> Wav2Vec2Config:
    """The named preset config (``tiny``, ``small``, ``base``, ``large``)."""
    if name not in PRESETS:
        raise ValueError(f"`name` must be one of {sorted(PRESETS)}, but is {name!r} instead.")
    return PRESETS[name]()
