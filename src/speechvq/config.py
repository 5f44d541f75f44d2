"""Model configuration dataclasses and presets.

Each field is documented once, by the attribute docstring directly under it; the fairseq name of
the option is given where it differs. Presets are written as deltas of :func:`wav2vec2_base`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ConvSpec = tuple[int, int, int]
"""One conv layer of the feature encoder: (out_channels, kernel_size, stride)."""

BASE_CONV_LAYERS: tuple[ConvSpec, ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass(kw_only=True)
class FeatureEncoderConfig:
    """The raw-waveform CNN feature encoder (fairseq ``conv_feature_layers``)."""

    conv_layers: tuple[ConvSpec, ...] = BASE_CONV_LAYERS
    """(channels, kernel, stride) per layer. The default gives 49 Hz frames (stride 320 samples)
    with a 400-sample receptive field."""

    norm_mode: Literal["group_norm", "layer_norm"] = "group_norm"
    """``group_norm``: GroupNorm (one group per channel) on the first layer only (BASE, fairseq
    ``default``). ``layer_norm``: LayerNorm over channels after every layer (LARGE)."""

    conv_bias: bool = False
    """Whether the conv layers have a bias (fairseq ``conv_bias``; True for LARGE)."""

    grad_mult: float = 1.0
    """Scale of the gradient flowing into the encoder (fairseq ``feature_grad_mult``); 0 freezes
    the encoder and runs it without autograd."""

    def __post_init__(self) -> None:
        self.conv_layers = tuple(tuple(int(v) for v in spec) for spec in self.conv_layers)  # type: ignore[misc]
        if not self.conv_layers:
            raise ValueError("`conv_layers` must hold at least one layer, but is empty instead.")
        for spec in self.conv_layers:
            if len(spec) != 3 or min(spec) < 1:
                raise ValueError(
                    f"each of `conv_layers` must be (channels, kernel, stride) >= 1, but is {spec} instead."
                )
        if self.norm_mode not in ("group_norm", "layer_norm"):
            raise ValueError(
                f"`norm_mode` must be 'group_norm' or 'layer_norm', but is {self.norm_mode!r} instead."
            )
        if self.grad_mult < 0:
            raise ValueError(f"`grad_mult` must be >= 0, but is {self.grad_mult} instead.")

    @property
    def out_channels(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def stride(self) -> int:
        """Samples per output frame (product of the strides)."""
        total = 1
        for _, _, s in self.conv_layers:
            total *= s
        return total


@dataclass(kw_only=True)
class QuantizerConfig:
    """Gumbel-softmax product quantizer (fairseq ``GumbelVectorQuantizer``)."""

    num_codebooks: int = 2
    """G, number of codebook groups (fairseq ``latent_groups``)."""

    codebook_size: int = 320
    """V, entries per group (fairseq ``latent_vars``)."""

    codevector_dim: int = 256
    """Dimension of the concatenated quantized vector, split evenly over the groups (fairseq
    ``latent_dim``, HF ``codevector_dim``)."""

    temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995)
    """(start, end, decay per update): tau = max(start * decay**num_updates, end)
    (fairseq ``latent_temp``)."""

    dropout_p: float = 0.0
    """Dropout on the quantizer input (fairseq ``dropout_features``)."""

    def __post_init__(self) -> None:
        self.temperature = tuple(float(t) for t in self.temperature)  # type: ignore[assignment]
        if self.codevector_dim % self.num_codebooks != 0:
            raise ValueError(
                f"`codevector_dim` must be a multiple of `num_codebooks` ({self.num_codebooks}), "
                f"but is {self.codevector_dim} instead."
            )
        if len(self.temperature) != 3:
            raise ValueError(f"`temperature` must be (start, end, decay), but is {self.temperature} instead.")


@dataclass(kw_only=True)
class MaskConfig:
    """Time-span masking of the context network's input (fairseq ``compute_mask_indices``)."""

    mask_prob: float = 0.65
    """Expected fraction of frames chosen as span starts, times ``mask_length``: the number of
    spans per utterance is ``mask_prob * T / mask_length`` (fairseq and HF semantics; 0.65 with
    spans of 10 is the paper's p = 0.065 and masks ~49% of frames)."""

    mask_length: int = 10
    """M, span length in frames."""

    min_masks: int = 2
    """Minimum number of spans per utterance."""

    require_same_masks: bool = False
    """Trim every utterance's mask to the batch minimum, as fairseq does by default. Off here:
    speechvq handles a different number of targets per utterance exactly."""

    channel_prob: float = 0.0
    """Probability used for channel (feature) span masking; 0 disables it (fine-tuning uses it)."""

    channel_length: int = 10
    """Channel span length."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob:
            raise ValueError(f"`mask_prob` must be >= 0, but is {self.mask_prob} instead.")
        if self.mask_length < 1:
            raise ValueError(f"`mask_length` must be >= 1, but is {self.mask_length} instead.")


@dataclass(kw_only=True)
class ContextConfig:
    """Transformer context network with a convolutional positional embedding."""

    dim: int = 768
    """D, model dimension (fairseq ``encoder_embed_dim``)."""

    num_layers: int = 12
    """Transformer blocks (fairseq ``encoder_layers``)."""

    num_heads: int = 12
    """Attention heads (fairseq ``encoder_attention_heads``)."""

    ffn_dim: int = 3072
    """Feed-forward inner dimension (fairseq ``encoder_ffn_embed_dim``)."""

    layer_norm_first: bool = False
    """Pre-LN blocks with a final LayerNorm (LARGE, HF ``do_stable_layer_norm``); post-LN if False."""

    pos_conv_kernel: int = 128
    """Kernel of the convolutional positional embedding (fairseq ``conv_pos``)."""

    pos_conv_groups: int = 16
    """Groups of the convolutional positional embedding (fairseq ``conv_pos_groups``)."""

    dropout_p: float = 0.1
    """Dropout on residual branches and the context input (fairseq ``dropout``)."""

    attention_dropout_p: float = 0.1
    """Dropout on attention probabilities (fairseq ``attention_dropout``)."""

    activation_dropout_p: float = 0.0
    """Dropout after the FFN activation (fairseq ``activation_dropout``)."""

    layer_drop_p: float = 0.05
    """Probability of skipping a whole block in training (fairseq ``encoder_layerdrop``)."""

    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"`dim` must be a multiple of `num_heads` ({self.num_heads}), but is {self.dim} instead."
            )
        if self.dim % self.pos_conv_groups != 0:
            raise ValueError(
                f"`dim` must be a multiple of `pos_conv_groups` ({self.pos_conv_groups}), "
                f"but is {self.dim} instead."
            )


@dataclass(kw_only=True)
class LossConfig:
    """Contrastive objective of wav2vec 2.0 (paper section 3.3)."""

    num_negatives: int = 100
    """K, distractors per target, drawn from the same utterance's masked frames."""

    logit_temp: float = 0.1
    """kappa, temperature of the cosine-similarity logits."""

    diversity_weight: float = 0.1
    """alpha, weight of the codebook diversity loss (fairseq ``loss_weights[0]``)."""

    feature_penalty_weight: float = 10.0
    """Weight of the L2 penalty on the encoder output (fairseq ``loss_weights[1]``)."""


@dataclass(kw_only=True)
class Wav2Vec2Config:
    """wav2vec 2.0 pretraining model. The defaults are the paper's BASE."""

    encoder: FeatureEncoderConfig = field(default_factory=FeatureEncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    final_dim: int = 256
    """Dimension of the space where context outputs and quantized targets are compared
    (fairseq ``final_dim``, HF ``proj_codevector_dim``)."""

    feature_dropout_p: float = 0.1
    """Dropout on the projected features before masking (fairseq ``dropout_input``)."""

    def __post_init__(self) -> None:
        for name, cls in (
            ("encoder", FeatureEncoderConfig),
            ("quantizer", QuantizerConfig),
            ("mask", MaskConfig),
            ("context", ContextConfig),
            ("loss", LossConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict (tuples become lists)."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Wav2Vec2Config:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming the key."""
        return _from_plain(cls, data)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"config for {cls.__name__} must be a mapping, but is {type(data).__name__} instead.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TypeError(f"unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _SUBCONFIGS.get((cls.__name__, name))
        kwargs[name] = _from_plain(sub, value) if sub is not None else value
    return cls(**kwargs)


_SUBCONFIGS: dict[tuple[str, str], type] = {
    ("Wav2Vec2Config", "encoder"): FeatureEncoderConfig,
    ("Wav2Vec2Config", "quantizer"): QuantizerConfig,
    ("Wav2Vec2Config", "mask"): MaskConfig,
    ("Wav2Vec2Config", "context"): ContextConfig,
    ("Wav2Vec2Config", "loss"): LossConfig,
}


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
