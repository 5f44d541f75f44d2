"""wav2vec 2.0 model configs: the parts (feature encoder, quantizers, masking, context network,
loss) and the :class:`Wav2Vec2Config` that composes them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from speechvq.config.limits import MAX_LAYERS, MAX_PARAMETERS, MAX_SIZE, _check_probabilities, _check_sizes
from speechvq.config.plain import to_plain
from speechvq.config.waveform import FAIRSEQ_NORMALIZE_EPS, WaveformNorm
from speechvq.configio import from_dict


def approx_parameters(encoder: FeatureEncoderConfig, context: ContextConfig) -> int:
    """Parameters of the feature encoder, projection and context network (an upper estimate
    checked before anything is built)."""
    total, channels = 0, 1
    if encoder.kind == "conv":
        for out, kernel, _ in encoder.conv_layers:
            total += channels * out * kernel + 2 * out
            channels = out
    else:
        channels = encoder.out_channels
    d, f = context.dim, context.ffn_dim
    total += channels * d + d  # feature projection
    total += d * (d // context.pos_conv_groups) * context.pos_conv_kernel  # positional convolution
    return total + context.num_layers * (4 * d * d + 2 * d * f + 9 * d + f)


ConvSpec = tuple[int, int, int]
"""One conv layer of the feature encoder: (out_channels, kernel_size, stride)."""

BASE_CONV_LAYERS: tuple[ConvSpec, ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass(kw_only=True)
class FeatureEncoderConfig:
    """The feature encoder: the raw-waveform CNN (fairseq ``conv_feature_layers``), or a log-mel
    filterbank front end (fairseq2's fbank extractor) for small compute budgets."""

    kind: Literal["conv", "fbank"] = "conv"
    """``conv``: the raw-waveform CNN of the paper (the fields below). ``fbank``: parameter-free
    per-utterance normalised log-mel frames (``num_mels`` x ``fbank_stack``, 20 ms frames with a
    stack of 2); the context network learns from the first updates, see
    :mod:`speechvq.models.fbank`. Only ``conv`` models convert to transformers and fairseq."""

    num_mels: int = 80
    """``fbank``: mel channels per 10 ms frame."""

    fbank_stack: int = 2
    """``fbank``: 10 ms frames concatenated into one output frame."""

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

    checkpoint_activations: bool = False
    """Keep only each conv layer's input for the backward and recompute the rest (activation
    checkpointing, transformers ``gradient_checkpointing``): less memory on long utterances for
    one more forward of the encoder. The results are unchanged."""

    def __post_init__(self) -> None:
        self.conv_layers = tuple(tuple(int(v) for v in spec) for spec in self.conv_layers)  # type: ignore[misc]
        if not 1 <= len(self.conv_layers) <= MAX_LAYERS:
            raise ValueError(
                f"`conv_layers` must hold 1 to {MAX_LAYERS} layers, but holds {len(self.conv_layers)} instead."
            )
        for spec in self.conv_layers:
            if len(spec) != 3 or min(spec) < 1 or max(spec) > MAX_SIZE:
                raise ValueError(
                    f"each of `conv_layers` must be (channels, kernel, stride) in [1, {MAX_SIZE}], "
                    f"but is {spec} instead."
                )
        if self.norm_mode not in ("group_norm", "layer_norm"):
            raise ValueError(
                f"`norm_mode` must be 'group_norm' or 'layer_norm', but is {self.norm_mode!r} instead."
            )
        if self.grad_mult < 0:
            raise ValueError(f"`grad_mult` must be >= 0, but is {self.grad_mult} instead.")
        if self.kind not in ("conv", "fbank"):
            raise ValueError(f"`kind` must be 'conv' or 'fbank', but is {self.kind!r} instead.")
        if self.num_mels < 1 or self.fbank_stack < 1:
            raise ValueError(
                f"`num_mels` and `fbank_stack` must be >= 1, but are {self.num_mels} and {self.fbank_stack} instead."
            )
        _check_sizes(self, ("num_mels", "fbank_stack"), high=4096)

    @property
    def out_channels(self) -> int:
        if self.kind == "fbank":
            return self.num_mels * self.fbank_stack
        return self.conv_layers[-1][0]

    @property
    def stride(self) -> int:
        """Samples per output frame (product of the strides; 160 x stack for ``fbank``)."""
        if self.kind == "fbank":
            return 160 * self.fbank_stack
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

    weight_proj_depth: int = 1
    """Layers of the logit projection (fairseq ``quantizer_depth`` / vq-wav2vec ``vq_depth``);
    above 1, hidden Linear + activation layers precede the final logit Linear."""

    weight_proj_factor: int = 3
    """Width of those hidden layers as a multiple of the input dim (fairseq ``quantizer_factor``;
    vq-wav2vec uses 2). Unused when ``weight_proj_depth`` is 1."""

    combine_groups: bool = False
    """One codebook of V entries shared by all G groups (fairseq ``combine_groups``)."""

    def __post_init__(self) -> None:
        self.temperature = tuple(float(t) for t in self.temperature)  # type: ignore[assignment]
        _check_sizes(self, ("num_codebooks", "codebook_size", "codevector_dim", "weight_proj_factor"))
        _check_sizes(self, ("weight_proj_depth",), high=MAX_LAYERS)
        _check_probabilities(self, ("dropout_p",))
        if self.weight_proj_depth < 1:
            raise ValueError(f"`weight_proj_depth` must be >= 1, but is {self.weight_proj_depth} instead.")
        if self.codevector_dim % self.num_codebooks != 0:
            raise ValueError(
                f"`codevector_dim` must be a multiple of `num_codebooks` ({self.num_codebooks}), "
                f"but is {self.codevector_dim} instead."
            )
        if len(self.temperature) != 3:
            raise ValueError(f"`temperature` must be (start, end, decay), but is {self.temperature} instead.")
        start, end, decay = self.temperature
        if not (math.isfinite(start) and 0 < end <= start and 0 < decay <= 1):
            raise ValueError(
                f"`temperature` must be (start, end, decay) with start >= end > 0 and decay in (0, 1], "
                f"but is {self.temperature} instead."
            )


@dataclass(kw_only=True)
class KMeansQuantizerConfig:
    """k-means (VQ-VAE style) product quantizer (fairseq ``KmeansVectorQuantizer``, vq-wav2vec
    paper section 3.2): nearest codeword by Euclidean distance with straight-through gradients."""

    num_codebooks: int = 2
    """G, number of codebook groups (fairseq ``vq_groups``)."""

    codebook_size: int = 320
    """V, entries per group (fairseq ``vq_vars``)."""

    codevector_dim: int = 256
    """Dimension of the concatenated quantized vector; the input is projected to it by a grouped
    1x1 conv + GroupNorm (fairseq ties it to the input dim)."""

    combine_groups: bool = False
    """One codebook of V entries shared by all G groups (fairseq ``combine_groups``)."""

    gamma: float = 0.25
    """Weight of the commitment loss (fairseq ``vq_gamma``)."""

    loss_weight: float = 1.0
    """Weight of the codebook + gamma * commitment loss in the model's objective (fairseq
    ``loss_weights``; it multiplies the number of targets, like the diversity loss)."""

    ema_decay: float | None = None
    """If set (e.g. 0.99), codewords follow an exponential moving average of the inputs assigned
    to them instead of the codebook loss (VQ-VAE-2); beyond fairseq."""

    dead_code_threshold: float = 0.0
    """Codewords whose moving-average usage (assignments per batch) falls below this are reset to
    a random input of the batch; 0 disables the reset. Beyond fairseq."""

    def __post_init__(self) -> None:
        _check_sizes(self, ("num_codebooks", "codebook_size", "codevector_dim"))
        if self.codevector_dim % self.num_codebooks != 0:
            raise ValueError(
                f"`codevector_dim` must be a multiple of `num_codebooks` ({self.num_codebooks}), "
                f"but is {self.codevector_dim} instead."
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1) or None, but is {self.ema_decay} instead.")
        if self.dead_code_threshold < 0:
            raise ValueError(
                f"`dead_code_threshold` must be >= 0, but is {self.dead_code_threshold} instead."
            )


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
        if self.mask_prob < 0.0:
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

    checkpoint_activations: bool = False
    """Keep only each block's input for the backward and recompute the block (activation
    checkpointing, fairseq ``checkpoint_activations``): less memory on long utterances for one
    more forward of the blocks. Dropout draws are replayed, so the results are unchanged."""

    def __post_init__(self) -> None:
        _check_sizes(self, ("dim", "num_heads", "ffn_dim", "pos_conv_kernel", "pos_conv_groups"))
        _check_sizes(self, ("num_layers",), low=0, high=MAX_LAYERS)
        _check_probabilities(
            self, ("dropout_p", "attention_dropout_p", "activation_dropout_p", "layer_drop_p")
        )
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

    def __post_init__(self) -> None:
        if not (
            isinstance(self.logit_temp, (int, float))
            and math.isfinite(self.logit_temp)
            and self.logit_temp > 0
        ):
            raise ValueError(f"`logit_temp` must be a finite number > 0, but is {self.logit_temp!r} instead.")
        _check_sizes(self, ("num_negatives",), low=0)


class _QuantizedModelConfig:
    """What the wav2vec 2.0 and vq-wav2vec configs share: the active quantizer's output size and
    plain-dict (JSON/YAML) conversion. Subclasses have ``quantizer_type``, ``quantizer`` and
    ``kmeans`` fields."""

    quantizer_type: str
    quantizer: QuantizerConfig
    kmeans: KMeansQuantizerConfig

    @property
    def codevector_dim(self) -> int:
        """Dimension of the quantized vectors of the active quantizer."""
        if self.quantizer_type == "kmeans":
            return self.kmeans.codevector_dim
        return self.quantizer.codevector_dim

    @property
    def codebook_shape(self) -> tuple[int, int]:
        """(G, V) of the active quantizer: codebook groups and entries per group."""
        if self.quantizer_type == "kmeans":
            return self.kmeans.num_codebooks, self.kmeans.codebook_size
        return self.quantizer.num_codebooks, self.quantizer.codebook_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict (tuples become lists)."""
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> Any:
        """Inverse of :meth:`to_dict` (:func:`speechvq.configio.from_dict`: typed, one-line
        errors naming the field, prefixed by ``where``; unknown keys refused)."""
        return from_dict(cls, data, where)


@dataclass(kw_only=True)
class Wav2Vec2Config(_QuantizedModelConfig):
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

    quantizer_type: Literal["gumbel", "kmeans"] = "gumbel"
    """Which quantizer makes the targets: ``gumbel`` (the paper, settings in ``quantizer``) or
    ``kmeans`` (settings in ``kmeans``; its codebook + commitment loss replaces the diversity loss)."""

    kmeans: KMeansQuantizerConfig = field(default_factory=KMeansQuantizerConfig)
    """Settings of the k-means quantizer, used when ``quantizer_type`` is ``kmeans``."""

    @property
    def waveform_norm(self) -> WaveformNorm:
        """Input normalisation, derived from the encoder: a LayerNorm encoder (LARGE,
        ``norm_mode: layer_norm``) is pretrained on normalised waveforms (fairseq
        ``task.normalize``) with fairseq's eps 1e-5, which the caller applies; the data section of
        a pretraining run should read it from here."""
        return WaveformNorm(enabled=self.encoder.norm_mode == "layer_norm", eps=FAIRSEQ_NORMALIZE_EPS)

    def __post_init__(self) -> None:
        if self.quantizer_type not in ("gumbel", "kmeans"):
            raise ValueError(
                f"`quantizer_type` must be 'gumbel' or 'kmeans', but is {self.quantizer_type!r} instead."
            )
        _check_sizes(self, ("final_dim",))
        _check_probabilities(self, ("feature_dropout_p",))
        total = approx_parameters(self.encoder, self.context)
        if total > MAX_PARAMETERS:
            raise ValueError(
                f"the model must have at most {MAX_PARAMETERS:.0e} parameters, but this config describes "
                f"about {total:.2e} instead."
            )
