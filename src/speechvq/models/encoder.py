"""Raw-waveform convolutional feature encoder (wav2vec 2.0 paper section 2)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from speechvq.config import FeatureEncoderConfig
from speechvq.models import kernels
from speechvq.models.common import Conv1d, GradMultiply


def conv_output_lengths(lengths: Tensor, conv_layers: tuple[tuple[int, int, int], ...]) -> Tensor:
    """Frames produced by the conv stack: floor((L - k) / s) + 1 per layer, clamped at 0.

    Args:
        lengths: ``[B]`` input lengths in samples.
        conv_layers: (channels, kernel, stride) per layer.

    Returns:
        ``[B]`` output lengths in frames (int64).
    """
    out = lengths.to(torch.long)
    for _, kernel, stride in conv_layers:
        out = torch.div(out - kernel, stride, rounding_mode="floor") + 1
        out = out.clamp(min=0)
    return out


def receptive_field(conv_layers: tuple[tuple[int, int, int], ...]) -> int:
    """Samples that the first frame of the conv stack depends on (the minimum input length)."""
    field, jump = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


def check_waveforms(waveforms: Tensor, lengths: Tensor | None, min_samples: int) -> Tensor:
    """Validate a ``[B, S]`` batch and return its ``[B]`` lengths (all S when None).

    Raises:
        ValueError: if ``waveforms`` is not 2-D, or an utterance is shorter than ``min_samples``.
    """
    if waveforms.ndim != 2:
        raise ValueError(
            f"`waveforms` must be 2-D [batch, samples], but has shape {tuple(waveforms.shape)} instead."
        )
    batch, num_samples = waveforms.shape
    if lengths is None:
        lengths = torch.full((batch,), num_samples, dtype=torch.long, device=waveforms.device)
    if batch and int(lengths.min()) < min_samples:
        raise ValueError(
            f"every input must hold at least {min_samples} samples (one frame), "
            f"but the shortest holds {int(lengths.min())} instead."
        )
    return lengths


class MaskedGroupNorm(nn.Module):
    """GroupNorm with one group per channel whose statistics skip padded frames.

    Without padding it equals ``nn.GroupNorm(C, C)`` (the BASE model's first-layer norm); with
    padding each utterance is normalised over its own frames only, so a padded batch gives the
    same result per utterance as each utterance alone. Statistics are computed in fp32 whatever
    the input dtype; the normalisation itself is one fused multiply-add in the input dtype.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """x: ``[B, T, C]``; lengths: ``[B]`` frames or None."""
        batch = x.size(0)
        if lengths is None:
            var, mean = torch.var_mean(x.float(), dim=1, unbiased=False, keepdim=True)  # (B, 1, C)
        else:
            # per utterance over its valid frames; B is small, the reductions are the cost
            stats = [
                torch.var_mean(x[b, : int(lengths[b])].float(), dim=0, unbiased=False) for b in range(batch)
            ]
            var = torch.stack([v for v, _ in stats])[:, None, :]
            mean = torch.stack([m for _, m in stats])[:, None, :]
        scale, shift = self.scale_shift(var, mean)
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

    def scale_shift(self, var: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """The normalisation as ``x * scale + shift``: fp32 ``[B, 1, C]`` each, from the fp32
        statistics."""
        scale = torch.rsqrt(var + self.eps) * self.weight.float()
        return scale, self.bias.float() - mean * scale


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, T, C]`` tensor (the LARGE model's conv norm)."""

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


class ConvLayerBlock(nn.Module):
    """Conv1d -> optional norm -> GELU on ``[B, T, C]`` features, propagating lengths.

    Activations stay time-major (``[B, T, C]``) between layers; ``conv.weight`` is
    ``[C_out, C_in, k]``, as in fairseq and transformers. The fast kernels compute the same
    convolution in other forms (:mod:`speechvq.models.kernels.feature_encoder`).
    """

    def __init__(self, conv: nn.Conv1d, norm: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.kernel = int(conv.kernel_size[0])
        self.stride = int(conv.stride[0])

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x: ``[B, S, C_in]`` -> ``[B, S', C_out]``; lengths in and out in steps of this layer."""
        if lengths is not None:
            lengths = conv_output_lengths(lengths, ((0, self.kernel, self.stride),))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, S, C_in) -> (B, C_out, S') -> (B, S', C_out)
        if self.norm is not None:
            x = self.norm(x, lengths)
        return F.gelu(x), lengths


class ConvFeatureEncoder(nn.Module):
    """Stack of :class:`ConvLayerBlock`, raw waveform to frame features.

    Build it with :func:`build_feature_encoder`.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        conv_layers: tuple[tuple[int, int, int], ...],
        grad_mult: float,
        checkpoint_activations: bool = False,
    ):
        super().__init__()
        self.layers = layers
        self.conv_layers = conv_layers
        self.grad_mult = grad_mult
        self.checkpoint_activations = checkpoint_activations

    @property
    def receptive_field(self) -> int:
        """Samples that the first frame depends on (the minimum input length)."""
        return receptive_field(self.conv_layers)

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive output frames (product of the strides)."""
        return math.prod(s for _, _, s in self.conv_layers)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``[B]`` samples -> ``[B]`` frames (see :func:`conv_output_lengths`)."""
        return conv_output_lengths(lengths, self.conv_layers)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode waveforms.

        Args:
            waveforms: ``[B, S]`` float samples.
            lengths: ``[B]`` valid samples per utterance; None means all are S long.

        Returns:
            features ``[B, T, C]`` and their valid lengths ``[B]`` in frames.

        Raises:
            ValueError: if ``waveforms`` is not 2-D, or an utterance is shorter than one frame.
        """
        lengths = check_waveforms(waveforms, lengths, self.receptive_field)
        with torch.no_grad() if self.grad_mult == 0.0 else contextlib.nullcontext():
            x, frame_lengths = self._encode(waveforms, lengths)
        if self.grad_mult not in (0.0, 1.0):
            x = GradMultiply.apply(x, self.grad_mult)
        return x, frame_lengths

    def _encode(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, S]`` waveforms, ``[B]`` lengths -> features ``[B, T, C]``, frame lengths ``[B]``."""
        return self._layers(waveforms[:, :, None], lengths)  # (B, S) -> (B, S, 1)

    def _layers(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Run the conv layers on ``[B, S, 1]``; lengths in samples -> frames (None: all valid)."""
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        frame_lengths = lengths
        for layer in self.layers:
            if recompute:  # keep only the layer's input; recompute the rest in the backward
                x, frame_lengths = checkpoint(layer, x, frame_lengths, use_reentrant=False)
            else:
                x, frame_lengths = layer(x, frame_lengths)
        if frame_lengths is None:
            frame_lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
        return x, frame_lengths


def min_input_samples(cfg: FeatureEncoderConfig) -> int:
    """Samples the front end of ``cfg`` needs for one frame (shorter input is an error in ``forward``)."""
    if cfg.kind == "fbank":
        from speechvq.models.fbank import FbankFeatureEncoder

        return FbankFeatureEncoder(num_mels=cfg.num_mels, stack=cfg.fbank_stack).receptive_field
    return receptive_field(cfg.conv_layers)


def build_feature_encoder(cfg: FeatureEncoderConfig, *, fast: bool = True) -> ConvFeatureEncoder:
    """Build the feature encoder of ``cfg``: the CNN, or the log-mel front end for ``kind: fbank``;
    ``fast`` selects the fast kernels (:mod:`speechvq.models.kernels`), else plain PyTorch."""
    if cfg.kind == "fbank":
        from speechvq.models.fbank import FbankFeatureEncoder

        return FbankFeatureEncoder(num_mels=cfg.num_mels, stack=cfg.fbank_stack)  # type: ignore[return-value]
    layers = []
    in_channels = 1
    for i, (channels, kernel, stride) in enumerate(cfg.conv_layers):
        conv = Conv1d(in_channels, channels, kernel, stride=stride, bias=cfg.conv_bias)
        nn.init.kaiming_normal_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        norm: nn.Module | None
        if cfg.norm_mode == "layer_norm":
            norm = ChannelLayerNorm(channels)
        elif i == 0:
            norm = MaskedGroupNorm(channels)
        else:
            norm = None
        layers.append(ConvLayerBlock(conv, norm))
        in_channels = channels
    encoder = ConvFeatureEncoder(
        nn.ModuleList(layers), cfg.conv_layers, cfg.grad_mult, cfg.checkpoint_activations
    )
    return kernels.select_(encoder, fast=fast)
