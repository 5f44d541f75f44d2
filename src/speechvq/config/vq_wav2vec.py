"""vq-wav2vec model config and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from speechvq.config.model import ConvSpec, KMeansQuantizerConfig, QuantizerConfig, _QuantizedModelConfig
from speechvq.config.waveform import WaveformNorm

VQ_WAV2VEC_CONV_LAYERS: tuple[ConvSpec, ...] = (
    ((512, 10, 5), (512, 8, 4)) + ((512, 4, 2),) * 3 + ((512, 1, 1),) * 3
)
"""vq-wav2vec's encoder: 10 ms frames (stride 160 samples), 465-sample (~30 ms) receptive field."""

VQ_WAV2VEC_AGGREGATOR_LAYERS: tuple[ConvSpec, ...] = tuple((512, k, 1) for k in range(2, 14))
"""vq-wav2vec's aggregator: 12 causal conv layers with kernels 2..13."""


@dataclass(kw_only=True)
class VqWav2VecConfig(_QuantizedModelConfig):
    """vq-wav2vec (Baevski et al., 2019) with wav2vec's future-prediction objective (fairseq
    ``wav2vec`` model). The defaults are the paper's Gumbel model; see :func:`vq_wav2vec_kmeans`."""

    encoder_layers: tuple[ConvSpec, ...] = VQ_WAV2VEC_CONV_LAYERS
    """(channels, kernel, stride) of the encoder convs (fairseq ``conv_feature_layers``)."""

    encoder_kind: Literal["conv", "fbank"] = "conv"
    """``conv``: the raw-waveform CNN of ``encoder_layers`` (the paper). ``fbank``: per-utterance
    normalised log-mel frames (``num_mels`` x ``fbank_stack``; 10 ms frames with ``fbank_stack``
    1, the CNN's rate) instead of the CNN, for small budgets, where the CNN does not leave chance
    (docs/vq_wav2vec.md); fairseq has no such front end, so such a model does not export there."""

    num_mels: int = 80
    """Log-mel channels of the ``fbank`` front end."""

    fbank_stack: int = 1
    """Consecutive 10 ms log-mel frames concatenated per frame by the ``fbank`` front end."""

    aggregator_layers: tuple[ConvSpec, ...] = VQ_WAV2VEC_AGGREGATOR_LAYERS
    """(channels, kernel, stride) of the aggregator convs (fairseq ``conv_aggregator_layers``)."""

    activation: Literal["gelu", "relu"] = "gelu"
    """Activation of every conv block and of the Gumbel logit projection (fairseq ``activation``)."""

    log_compression: bool = False
    """log(|x| + 1) on the encoder output (fairseq ``log_compression``; off in the vq-wav2vec
    command, on in wav2vec 1.0's)."""

    encoder_skip_connections: bool = False
    """Residual connections between encoder layers of equal width (fairseq ``skip_connections_feat``)."""

    aggregator_skip_connections: bool = True
    """Residual connections in the aggregator (fairseq ``skip_connections_agg``)."""

    residual_scale: float = 0.5
    """Residual sums are scaled by sqrt(residual_scale) (fairseq ``residual_scale``)."""

    aggregator_conv_bias: bool = True
    """Whether the aggregator convs have a bias (fairseq ``not no_conv_bias``)."""

    aggregator_zero_pad: bool = False
    """Left-pad the causal aggregator convs with zeros instead of replicating the first frame
    (fairseq ``agg_zero_pad``)."""

    quantizer_type: Literal["gumbel", "kmeans"] = "gumbel"
    """Which quantizer discretises the encoder output (fairseq ``vq_type``)."""

    quantizer: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(
            codevector_dim=512, weight_proj_depth=2, weight_proj_factor=2, combine_groups=True
        )
    )
    """Gumbel settings (fairseq ``vq_vars``, ``vq_groups``, ``vq_dim``, ``vq_depth``,
    ``combine_groups``, ``vq_temp``)."""

    kmeans: KMeansQuantizerConfig = field(default_factory=lambda: KMeansQuantizerConfig(codevector_dim=512))
    """k-means settings (fairseq ``vq_vars``, ``vq_groups``, ``vq_gamma``); ``codevector_dim``
    must equal the encoder width for fairseq compatibility."""

    prediction_steps: int = 12
    """Future frames predicted from each context vector (fairseq ``prediction_steps``)."""

    num_negatives: int = 10
    """Distractors per target, drawn from the same utterance (fairseq ``num_negatives``)."""

    offset: int | None = None
    """Frames between a context vector and its first target; None computes fairseq's ``auto``:
    ceil(receptive field / stride) of the encoder."""

    dropout_p: float = 0.0
    """Dropout inside the aggregator blocks and on the step predictions (fairseq ``dropout``)."""

    feature_dropout_p: float = 0.0
    """Dropout on the quantized features before the aggregator (fairseq ``dropout_features``)."""

    aggregator_dropout_p: float = 0.0
    """Dropout on the aggregator output (fairseq ``dropout_agg``)."""

    gumbel_diversity_weight: float = 0.0
    """Weight of (G V - prob_perplexity) for the Gumbel quantizer (fairseq ``loss_weights``;
    the vq-wav2vec command sets none, so 0)."""

    def __post_init__(self) -> None:
        for name in ("encoder_layers", "aggregator_layers"):
            layers = tuple(tuple(int(v) for v in spec) for spec in getattr(self, name))
            if not layers or any(len(spec) != 3 or min(spec) < 1 for spec in layers):
                raise ValueError(
                    f"`{name}` must be a non-empty list of (channels, kernel, stride) >= 1, "
                    f"but is {getattr(self, name)} instead."
                )
            setattr(self, name, layers)
        if self.quantizer_type not in ("gumbel", "kmeans"):
            raise ValueError(
                f"`quantizer_type` must be 'gumbel' or 'kmeans', but is {self.quantizer_type!r} instead."
            )
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"`activation` must be 'gelu' or 'relu', but is {self.activation!r} instead.")
        if self.encoder_kind not in ("conv", "fbank"):
            raise ValueError(
                f"`encoder_kind` must be 'conv' or 'fbank', but is {self.encoder_kind!r} instead."
            )
        if self.num_mels < 1 or self.fbank_stack < 1:
            raise ValueError(
                f"`num_mels` and `fbank_stack` must be >= 1, but are {self.num_mels} and {self.fbank_stack} instead."
            )
        if self.prediction_steps < 1:
            raise ValueError(f"`prediction_steps` must be >= 1, but is {self.prediction_steps} instead.")
        if self.num_negatives < 1:
            raise ValueError(f"`num_negatives` must be >= 1, but is {self.num_negatives} instead.")
        if self.offset is not None and self.offset < 1:
            raise ValueError(f"`offset` must be >= 1 or None, but is {self.offset} instead.")

    @property
    def waveform_norm(self) -> WaveformNorm:
        """Input normalisation: none (fairseq's vq-wav2vec task does not normalise)."""
        return WaveformNorm(enabled=False)

    @property
    def encoder_dim(self) -> int:
        """Channels of the encoder output (the quantizer's input)."""
        if self.encoder_kind == "fbank":
            return self.num_mels * self.fbank_stack
        return self.encoder_layers[-1][0]


def vq_wav2vec_gumbel() -> VqWav2VecConfig:
    """vq-wav2vec Gumbel (paper section 3.2; fairseq README): G=2, V=320 shared by the groups,
    two-layer logit projection, tau 2 -> 0.5."""
    return VqWav2VecConfig()


def vq_wav2vec_kmeans() -> VqWav2VecConfig:
    """vq-wav2vec k-means (paper section 3.2): G=2, V=320, gamma 0.25, loss weight 1."""
    return VqWav2VecConfig(quantizer_type="kmeans")


VQ_WAV2VEC_PRESETS = {
    "gumbel": vq_wav2vec_gumbel,
    "kmeans": vq_wav2vec_kmeans,
}
"""vq-wav2vec presets by name (``model.type: vq_wav2vec`` in a run config)."""
