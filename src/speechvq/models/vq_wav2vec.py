"""vq-wav2vec (Baevski et al., 2019): conv encoder, quantizer, causal conv aggregator, trained to
predict future quantized frames with wav2vec's binary cross-entropy (fairseq ``wav2vec`` model)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechvq.config import VqWav2VecConfig
from speechvq.losses import LossBreakdown
from speechvq.losses_wav2vec import (
    future_prediction_logits,
    future_prediction_loss,
    sample_future_distractors,
)
from speechvq.models import kernels
from speechvq.models.common import Conv1d, lengths_to_padding_mask
from speechvq.models.encoder import check_waveforms, conv_output_lengths, receptive_field
from speechvq.models.fbank import FbankFeatureEncoder
from speechvq.models.kernels import lowp_guard
from speechvq.models.kmeans_quantizer import build_kmeans_quantizer
from speechvq.models.protocol import FeatureEncoderGeometry, Layer, check_layer
from speechvq.models.quantizer import QuantizerOutput, VectorQuantizer, build_quantizer

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class UtteranceGroupNorm(nn.Module):
    """GroupNorm with a single group (statistics over all channels and frames of an utterance),
    in fp32, skipping padded frames (fairseq ``Fp32GroupNorm(1, C)`` when there is no padding)."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """x: ``[B, C, T]``; lengths: ``[B]`` valid frames or None."""
        h = x.float()
        if lengths is None or bool((lengths == x.size(-1)).all()):
            out = F.group_norm(h, 1, self.weight.float(), self.bias.float(), self.eps)
            return out.to(x.dtype)
        valid = (~lengths_to_padding_mask(lengths, x.size(-1))).to(h.dtype)[:, None, :]  # (B, 1, T)
        count = (valid.sum(-1, keepdim=True) * x.size(1)).clamp(min=1.0)  # (B, 1, 1)
        mean = (h * valid).sum((1, 2), keepdim=True) / count
        var = (((h - mean) * valid) ** 2).sum((1, 2), keepdim=True) / count
        out = (h - mean) * torch.rsqrt(var + self.eps)
        return (out * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]).to(x.dtype)


class ConvBlock(nn.Module):
    """(Causal left padding) -> Conv1d -> dropout -> single-group GroupNorm -> activation."""

    def __init__(
        self,
        conv: nn.Conv1d,
        norm: UtteranceGroupNorm,
        activation: nn.Module,
        *,
        dropout_p: float,
        left_pad: int,
        zero_pad: bool,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.dropout = nn.Dropout(dropout_p)
        self.norm = norm
        self.activation = activation
        self.left_pad = left_pad
        self.zero_pad = zero_pad

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x: ``[B, C_in, T]`` -> ``[B, C_out, T']``; lengths in frames of this block's output."""
        if self.left_pad > 0:
            x = F.pad(x, (self.left_pad, 0), mode="constant" if self.zero_pad else "replicate")
        x = self.conv(x)
        if lengths is not None:
            kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
            lengths = (torch.div(lengths + self.left_pad - kernel, stride, rounding_mode="floor") + 1).clamp(
                min=0
            )
        return self.activation(self.norm(self.dropout(x), lengths)), lengths


class Wav2VecFeatureEncoder(nn.Module):
    """wav2vec's raw-waveform encoder: conv blocks, optional skip connections, optional
    log-compression log(|x| + 1). Build it with :func:`build_vq_wav2vec`."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        conv_layers: tuple[tuple[int, int, int], ...],
        *,
        log_compression: bool,
        skip_connections: bool,
        residual_scale: float,
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.conv_layers = conv_layers
        self.log_compression = log_compression
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.conv_layers)

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive output frames (product of the strides)."""
        return math.prod(s for _, _, s in self.conv_layers)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return conv_output_lengths(lengths, self.conv_layers)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[B, S]`` samples (and ``[B]`` lengths) -> features ``[B, T, C]`` and ``[B]`` frames."""
        lengths = check_waveforms(waveforms, lengths, self.receptive_field)
        x = waveforms[:, None, :]  # (B, S) -> (B, 1, S)
        frame_lengths: Tensor | None = lengths
        for block in self.blocks:
            residual = x
            x, frame_lengths = block(x, frame_lengths)
            if self.skip_connections and x.size(1) == residual.size(1):
                # fairseq subsamples the residual to the block's frame rate
                frames = x.size(2)
                residual = residual[..., :: residual.size(2) // frames][..., :frames]
                x = (x + residual) * self.residual_scale
        if self.log_compression:
            x = (x.abs() + 1.0).log()
        assert frame_lengths is not None
        return x.transpose(1, 2), frame_lengths  # (B, C, T) -> (B, T, C)


class ConvAggregator(nn.Module):
    """wav2vec's context network: causal conv blocks with (projected) scaled residuals."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        residual_proj: nn.ModuleList,
        *,
        skip_connections: bool,
        residual_scale: float,
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.residual_proj = residual_proj
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``[B, T, C]`` -> ``[B, T, C']``; frame t depends on frames <= t only (normalisation
        statistics aside, which cover the utterance's valid frames)."""
        h = x.transpose(1, 2)  # (B, T, C) -> (B, C, T)
        for block, proj in zip(self.blocks, self.residual_proj):
            residual = h
            h, _ = block(h, lengths)
            if self.skip_connections:
                if isinstance(proj, nn.Conv1d):
                    residual = proj(residual)
                h = (h + residual) * self.residual_scale
        return h.transpose(1, 2)  # (B, C', T) -> (B, T, C')


class StepPredictor(nn.Module):
    """One linear map per future step from context to feature space (fairseq ``project_to_steps``,
    a ``ConvTranspose2d(C, D, (1, S))``, kept as such so that its weights load unchanged)."""

    def __init__(self, in_dim: int, out_dim: int, steps: int, dropout_p: float) -> None:
        super().__init__()
        self.project_to_steps = nn.ConvTranspose2d(in_dim, out_dim, (1, steps))
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, context: Tensor) -> Tensor:
        """``[B, T, C]`` -> ``[B, T, S, D]``."""
        weight = self.project_to_steps.weight[:, :, 0, :]  # (C, D, 1, S) -> (C, D, S)
        bias = self.project_to_steps.bias
        assert bias is not None
        out = lowp_guard.call(
            "einsum btc,cds->btsd",
            f"C {weight.size(0)}, D {weight.size(1)}, steps {weight.size(2)}",
            _project_to_steps,
            [context, weight],
            lowp_guard.randn_inputs((2, 50, weight.size(0)), tuple(weight.shape)),
        )
        return self.dropout(out + bias)


def _project_to_steps(context: Tensor, weight: Tensor) -> Tensor:
    """``[B, T, C]`` x ``[C, D, S]`` -> ``[B, T, S, D]``."""
    return torch.einsum("btc,cds->btsd", context, weight)


@dataclass
class VqWav2VecOutput:
    """Everything :meth:`VqWav2VecModel.forward` computes. N = number of (frame, step) targets."""

    features: Tensor
    """``[B, T, C]`` encoder output."""
    lengths: Tensor
    """``[B]`` valid frames."""
    quantizer: QuantizerOutput
    """Quantized features ``[B, T, D]`` (the prediction targets), codes and perplexities."""
    context: Tensor
    """``[B, T, C']`` aggregator output."""
    logits: Tensor
    """``[N, K + 1]`` logits (fp32), the true future frame first."""
    distractor_index: Tensor
    """``[B, T, K]`` distractor frames of every target frame."""
    mask: Tensor
    """``[B, T]`` bool, frames that are a prediction target (valid frames from ``offset`` on);
    nothing is masked in vq-wav2vec, the field lets one training loop serve both models."""

    @property
    def num_targets(self) -> int:
        return int(self.logits.size(0))


class VqWav2VecModel(FeatureEncoderGeometry, nn.Module):
    """vq-wav2vec. Build it with :func:`build_vq_wav2vec`.

    Args:
        feature_encoder: raw waveform -> ``[B, T, C]``.
        quantizer: Gumbel or k-means quantizer of the encoder output.
        aggregator: causal conv context network over the quantized features.
        predictor: per-step projections of the context.
        cfg: the config the parts were built from.

    It implements :class:`~speechvq.models.protocol.AudioModel`: layer 0 is the encoder output,
    layer 1 the aggregator's.
    """

    model_type = "vq_wav2vec"
    has_transformer = False
    num_layers = 1

    def __init__(
        self,
        feature_encoder: Wav2VecFeatureEncoder | FbankFeatureEncoder,
        quantizer: VectorQuantizer,
        aggregator: ConvAggregator,
        predictor: StepPredictor,
        cfg: VqWav2VecConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = feature_encoder
        self.quantizer = quantizer
        self.aggregator = aggregator
        self.predictor = predictor
        self.feature_dropout = nn.Dropout(cfg.feature_dropout_p)
        self.aggregator_dropout = nn.Dropout(cfg.aggregator_dropout_p)
        self.offset = cfg.offset if cfg.offset is not None else _auto_offset(feature_encoder)

    # -- the AudioModel protocol -----------------------------------------------------------------

    # frame_stride, receptive_field, waveform_norm, output_lengths: FeatureEncoderGeometry

    @torch.no_grad()
    def layer_features(
        self, waveforms: Tensor, lengths: Tensor | None, layer: Layer
    ) -> tuple[Tensor, Tensor]:
        """Unmasked features ``[B, T, D]`` of layer 0 (encoder) or 1 (aggregator), frame lengths ``[B]``."""
        check_layer(self, layer)
        features, frame_lengths, q = self.encode(waveforms, lengths)
        if layer == 0:
            return features, frame_lengths
        return self.aggregate(q.quantized, frame_lengths), frame_lengths

    # -- training state --------------------------------------------------------------------------

    def set_num_updates_(self, num_updates: int) -> None:
        """Set the update count that anneals the Gumbel temperature."""
        self.quantizer.set_num_updates_(num_updates)

    @property
    def cross_process_sum(self) -> Callable[[Tensor], Tensor] | None:
        """The quantizer's cross-process sum (see :meth:`set_cross_process_sum_`)."""
        return self.quantizer.cross_process_sum

    def set_cross_process_sum_(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Take the quantizer's batch statistics (Gumbel perplexities, k-means usage) over the
        whole data-parallel batch: see
        :meth:`~speechvq.models.quantizer.VectorQuantizer.set_cross_process_sum_`."""
        self.quantizer.set_cross_process_sum_(fn)

    # -- the forward pass ------------------------------------------------------------------------

    def encode(
        self, waveforms: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor, QuantizerOutput]:
        """Encoder features ``[B, T, C]``, frame lengths ``[B]`` and their quantization."""
        features, frame_lengths = self.feature_encoder(waveforms, lengths)
        valid = None
        if bool((frame_lengths < features.size(1)).any()):
            valid = ~lengths_to_padding_mask(frame_lengths, features.size(1))
        return features, frame_lengths, self.quantizer(features, valid)

    def aggregate(self, quantized: Tensor, lengths: Tensor) -> Tensor:
        """Aggregator output ``[B, T, C']`` of quantized features ``[B, T, D]``."""
        context = self.aggregator(self.feature_dropout(quantized), lengths)
        return self.aggregator_dropout(context)

    def forward(
        self,
        waveforms: Tensor,
        lengths: Tensor | None = None,
        *,
        distractor_index: Tensor | None = None,
        generator: torch.Generator | None = None,
        layer_drop_generator: torch.Generator | None = None,
    ) -> VqWav2VecOutput:
        """The training forward pass.

        Args:
            waveforms: ``[B, S]`` samples.
            lengths: ``[B]`` valid samples (None: all S).
            distractor_index: ``[B, T, K]`` distractor frames (see
                :func:`~speechvq.losses_wav2vec.sample_future_distractors`); drawn if None.
            generator: RNG for the distractors.
            layer_drop_generator: unused (no LayerDrop here); accepted so that the training loop
                calls both models alike.

        Returns:
            :class:`VqWav2VecOutput`; :meth:`compute_loss` turns it into the loss.
        """
        # 1. encode and quantize
        features, frame_lengths, q = self.encode(waveforms, lengths)
        _batch, frames, _ = features.shape
        # 2. aggregate the quantized features causally and predict S steps ahead
        context = self.aggregate(q.quantized, frame_lengths)
        predictions = self.predictor(context)  # (B, T, S, D)
        # 3. score each prediction against its true future frame and K distractors
        if distractor_index is None:
            distractor_index = sample_future_distractors(
                frame_lengths, frames, self.cfg.num_negatives, generator
            )
        logits = future_prediction_logits(
            predictions, q.quantized, distractor_index, frame_lengths, self.offset
        )
        return VqWav2VecOutput(
            features=features,
            lengths=frame_lengths,
            quantizer=q,
            context=context,
            logits=logits,
            distractor_index=distractor_index,
            mask=(torch.arange(frames, device=features.device)[None, :] >= self.offset)
            & ~lengths_to_padding_mask(frame_lengths, frames),
        )

    def compute_loss(self, output: VqWav2VecOutput) -> LossBreakdown:
        """L = BCE + w * N * quantizer loss, summed over the N positives (fairseq ``wav2vec``
        criterion). The quantizer term (k-means codebook + commitment loss, or the Gumbel
        G V - perplexity) is reported as ``diversity``."""
        n = output.num_targets
        lm = future_prediction_loss(output.logits)
        q = output.quantizer
        if self.cfg.quantizer_type == "kmeans":
            lq = self.cfg.kmeans.loss_weight * n * q.loss
        else:
            # fairseq's wav2vec criterion weights the unnormalised diversity penalty G V - ppl
            # (q.loss is that over G V; the product would not round alike)
            lq = self.cfg.gumbel_diversity_weight * n * (q.num_codes - q.prob_perplexity)
        zero = torch.zeros((), device=lm.device)
        return LossBreakdown(total=lm + lq, contrastive=lm, diversity=lq, feature_penalty=zero, num_targets=n)

    @torch.no_grad()
    def quantize(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[QuantizerOutput, Tensor]:
        """Quantizer output (codes ``[B, T, G]``) and frame lengths ``[B]``."""
        _, frame_lengths, q = self.encode(waveforms, lengths)
        return q, frame_lengths

    @torch.no_grad()
    def quantize_features(self, features: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput:
        """Quantizer output of encoder features ``[B, T, C]``."""
        return self.quantizer(features, ~padding_mask if padding_mask is not None else None)


def vq_min_input_samples(cfg: VqWav2VecConfig) -> int:
    """Samples the front end of ``cfg`` needs for one frame."""
    if cfg.encoder_kind == "fbank":
        return FbankFeatureEncoder(num_mels=cfg.num_mels, stack=cfg.fbank_stack).receptive_field
    return receptive_field(cfg.encoder_layers)


def _auto_offset(encoder: nn.Module) -> int:
    """fairseq's ``offset=auto`` of any front end: ceil(receptive field / frame stride)."""
    if isinstance(encoder, Wav2VecFeatureEncoder):
        return auto_offset(encoder.conv_layers)
    return math.ceil(int(encoder.receptive_field) / int(encoder.frame_stride))  # type: ignore[arg-type]


def auto_offset(conv_layers: tuple[tuple[int, int, int], ...]) -> int:
    """fairseq's ``offset=auto``: ceil(receptive field / total stride) of the encoder."""
    field, jump = 0, 0
    for _, kernel, stride in conv_layers:
        if field == 0:
            field = kernel
        field += (kernel - 1) * jump
        jump = stride if jump == 0 else jump * stride
    return math.ceil(field / jump)


def build_vq_wav2vec(cfg: VqWav2VecConfig, *, fast: bool = True) -> VqWav2VecModel:
    """Build a :class:`VqWav2VecModel` from its config; ``fast`` selects the fast kernels
    (:mod:`speechvq.models.kernels`: the Gumbel quantizer's linear layers), else plain PyTorch."""
    act = _ACTIVATIONS[cfg.activation]
    encoder: Wav2VecFeatureEncoder | FbankFeatureEncoder
    if cfg.encoder_kind == "fbank":
        encoder = FbankFeatureEncoder(num_mels=cfg.num_mels, stack=cfg.fbank_stack)
    else:
        blocks = []
        in_dim = 1
        for channels, kernel, stride in cfg.encoder_layers:
            conv = Conv1d(in_dim, channels, kernel, stride=stride, bias=False)
            blocks.append(
                ConvBlock(
                    conv, UtteranceGroupNorm(channels), act(), dropout_p=0.0, left_pad=0, zero_pad=False
                )
            )
            in_dim = channels
        encoder = Wav2VecFeatureEncoder(
            nn.ModuleList(blocks),
            cfg.encoder_layers,
            log_compression=cfg.log_compression,
            skip_connections=cfg.encoder_skip_connections,
            residual_scale=cfg.residual_scale,
        )
    embed = cfg.encoder_dim
    quantizer: VectorQuantizer
    if cfg.quantizer_type == "kmeans":
        quantizer = build_kmeans_quantizer(cfg.kmeans, embed)
    else:
        quantizer = build_quantizer(cfg.quantizer, embed, activation=cfg.activation, fast=fast)
    agg_blocks, projections = [], []
    in_dim = cfg.codevector_dim
    for channels, kernel, stride in cfg.aggregator_layers:
        if stride != 1:
            raise ValueError(f"aggregator strides must be 1, but one is {stride} instead.")
        conv = Conv1d(in_dim, channels, kernel, bias=cfg.aggregator_conv_bias)
        agg_blocks.append(
            ConvBlock(
                conv,
                UtteranceGroupNorm(channels),
                act(),
                dropout_p=cfg.dropout_p,
                left_pad=kernel - 1,
                zero_pad=cfg.aggregator_zero_pad,
            )
        )
        needs_proj = cfg.aggregator_skip_connections and in_dim != channels
        projections.append(Conv1d(in_dim, channels, 1, bias=False) if needs_proj else nn.Identity())
        in_dim = channels
    aggregator = ConvAggregator(
        nn.ModuleList(agg_blocks),
        nn.ModuleList(projections),
        skip_connections=cfg.aggregator_skip_connections,
        residual_scale=cfg.residual_scale,
    )
    predictor = StepPredictor(in_dim, cfg.codevector_dim, cfg.prediction_steps, cfg.dropout_p)
    return kernels.select_(VqWav2VecModel(encoder, quantizer, aggregator, predictor, cfg), fast=fast)
