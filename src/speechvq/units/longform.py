"""Features of long recordings in overlapping windows, in memory bounded by the window length.

A whole-utterance forward pass holds activations proportional to the recording (the CNN's first
layer alone keeps 512 channels per 5 samples: about 4 GB for 10 minutes of BASE) and attention
over every frame pair. Here a recording runs window by window: each window computes ``chunk_s``
seconds of output frames and sees ``context_s`` seconds more audio on each side, and only the
centre frames are kept, so memory depends on ``chunk_s + 2 * context_s``, not on the recording.

What is equal to the whole-utterance pass, and what is not:

* The statistics that the front end takes over the whole utterance are taken over the whole
  recording in a first pass, in chunks: the waveform's mean and variance (models that normalise
  it), the log-mel mean and variance per channel (``fbank`` front end), and the first conv
  layer's per-channel mean and variance (the CNN's GroupNorm, from the moments of its input
  windows as :func:`~speechvq.models.encoder.linear_output_moments` computes them). Windows start
  on frame boundaries, so the front end's output (layer 0) equals the whole-utterance output at
  every frame, up to float rounding (tested: 1e-5 of its scale).
* The Transformer attends within its window: a frame at least ``context_s`` from a window edge
  sees that much context on both sides, but not the rest of the recording. Blocks' outputs
  therefore differ from whole-utterance attention; the tests state the measured difference.
  (Training crops utterances to ``max_sample_size``, 15.6 s by default, so a window of that order
  is also what the model was trained on.)

Windows of a recording that fits in one window run as a single whole-utterance pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechvq.errors import UserInputError
from speechvq.models.fbank import FbankFeatureEncoder
from speechvq.models.protocol import TRANSFORMER_INPUT, AudioModel

SAMPLE_RATE = 16000
_STATS_CHUNK = 60 * SAMPLE_RATE
"""Samples per piece of the statistics pass."""


@dataclass(frozen=True)
class ChunkConfig:
    """How long recordings are cut into windows."""

    chunk_s: float = 10.0
    """Seconds of output frames each window computes."""
    context_s: float = 2.5
    """Seconds of extra audio on each side of a window's output frames."""

    def __post_init__(self) -> None:
        if self.chunk_s <= 0:
            raise UserInputError(f"--chunk-s must be positive, but is {self.chunk_s}")
        if self.context_s < 0:
            raise UserInputError(f"--context-s must be >= 0, but is {self.context_s}")

    @property
    def window_s(self) -> float:
        return self.chunk_s + 2 * self.context_s


DEFAULT_CHUNK = ChunkConfig()
"""10 s of output frames per window, 2.5 s of context each side: 15 s windows, the training crop."""


@dataclass
class FrontEndStats:
    """Whole-recording statistics the front end would compute over the whole utterance."""

    wave: tuple[float, float] | None = None
    """(mean, variance) of the waveform, for models that normalise it."""
    fbank: tuple[Tensor, Tensor] | None = None
    """(mean, variance) ``[M]`` of the log-mel energies over all valid 25 ms windows."""
    group_norm: tuple[Tensor, Tensor] | None = None
    """(variance, mean) ``[C]`` of the first conv layer's output (its GroupNorm statistics)."""


def _windowed(model: nn.Module) -> AudioModel:
    """``model`` as an :class:`AudioModel` with a Transformer; a usage error for any other."""
    if not (isinstance(model, AudioModel) and model.has_transformer):
        raise UserInputError(
            f"long recordings are windowed for models with a Transformer (wav2vec 2.0, CTC), not a {type(model).__name__}"
        )
    return model


def _group_norm_layer(encoder: nn.Module) -> Any | None:
    """The CNN's first layer when it has the utterance-level GroupNorm, else None."""
    from speechvq.models.encoder import MaskedGroupNorm

    first: Any = encoder.layers[0]  # type: ignore[index]
    return first if isinstance(first.norm, MaskedGroupNorm) else None


@torch.no_grad()
def front_end_stats(model: nn.Module, wave: Tensor) -> FrontEndStats:
    """The whole-recording statistics of :class:`FrontEndStats` for ``wave`` ``[S]``, in pieces."""
    audio = _windowed(model)
    m: Any = model
    stats = FrontEndStats()
    # the windows run the front end directly, not the model's forward, so the normalisation is
    # taken here whether the model's forward or its caller applies it otherwise
    if audio.waveform_norm.enabled:
        w = wave.double()
        stats.wave = (float(w.mean()), float(w.var(unbiased=False)))
        wave = _normalized(wave, stats.wave, audio.waveform_norm.eps)
    encoder = m.feature_encoder
    if isinstance(encoder, FbankFeatureEncoder):
        total = torch.zeros(encoder.num_mels, dtype=torch.float64)
        squares = torch.zeros_like(total)
        count = 0
        for start, stop in _pieces(wave.numel(), encoder.window_length, encoder.hop):
            mel = encoder.log_mel(wave[None, start:stop])[0].double()  # (N, M)
            total += mel.sum(0)
            squares += (mel * mel).sum(0)
            count += mel.size(0)
        mean = total / max(count, 1)
        stats.fbank = (mean.float(), (squares / max(count, 1) - mean * mean).clamp(min=0).float())
        return stats
    layer = _group_norm_layer(encoder)
    if layer is not None:
        k, s = layer.kernel, layer.stride
        weight = layer.conv.weight.reshape(layer.conv.out_channels, -1).double()  # (C, k), C_in = 1
        col_sum = torch.zeros(k, dtype=torch.float64)
        outer = torch.zeros(k, k, dtype=torch.float64)
        count = 0
        for start, stop in _pieces(wave.numel(), k, s):
            cols = wave[start:stop].double().unfold(0, k, s)  # (S,) -> (N, k)
            col_sum += cols.sum(0)
            outer += cols.t() @ cols
            count += cols.size(0)
        mu = col_sum / max(count, 1)
        cov = outer / max(count, 1) - torch.outer(mu, mu)
        mean = weight @ mu + (layer.conv.bias.double() if layer.conv.bias is not None else 0.0)
        var = ((weight @ cov) * weight).sum(1).clamp(min=0.0)  # w_c^T Cov w_c
        stats.group_norm = (var.float(), mean.float())
    return stats


def _pieces(num_samples: int, window: int, hop: int) -> Iterator[tuple[int, int]]:
    """Sample ranges whose ``window``-long, ``hop``-spaced frames are exactly the recording's."""
    per_piece = max(1, (_STATS_CHUNK - window) // hop + 1)  # frames per piece
    frames = (num_samples - window) // hop + 1 if num_samples >= window else 0
    for first in range(0, frames, per_piece):
        n = min(per_piece, frames - first)
        yield first * hop, first * hop + (n - 1) * hop + window


def _normalized(wave: Tensor, stats: tuple[float, float], eps: float) -> Tensor:
    """``wave`` normalised with the whole recording's (mean, variance) and the model's eps."""
    return ((wave.double() - stats[0]) / math.sqrt(stats[1] + eps)).float()


@torch.no_grad()
def _front_end(model: nn.Module, window: Tensor, stats: FrontEndStats) -> Tensor:
    """Front-end features ``[T, C]`` of ``window`` ``[S']`` (already normalised) with the
    whole-recording statistics."""
    encoder: Any = model.feature_encoder  # type: ignore[union-attr]
    if stats.fbank is not None:
        mel = encoder.log_mel(window[None])[0]  # (N, M)
        mean, var = stats.fbank
        normed = (mel - mean) * torch.rsqrt(var + 1e-5)  # the encoder's normalisation, global stats
        frames = mel.size(0) // encoder.stack
        return normed[: frames * encoder.stack].reshape(frames, -1)  # (N, M) -> (T, M * stack)
    if stats.group_norm is not None:
        first = encoder.layers[0]
        var, mean = stats.group_norm
        scale, shift = first.norm.scale_shift(var[None, None], mean[None, None])  # (1, 1, C)
        cols = window.unfold(0, first.kernel, first.stride)  # (S',) -> (T0, k)
        y = F.linear(cols, first.conv.weight.reshape(first.conv.out_channels, -1), first.conv.bias)
        x = F.gelu(y * scale[0] + shift[0])[None]  # (1, T0, C)
        for layer in list(encoder.layers)[1:]:
            x, _ = layer(x, None)
        return x[0]
    features, _ = encoder(window[None])
    return features[0]


@dataclass
class Window:
    """The frames one window contributes."""

    first_frame: int
    """Index of its first kept frame in the recording."""
    layers: dict[Any, Tensor]
    """Layer -> ``[n, D]`` features of its kept frames."""


def num_frames(model: AudioModel, num_samples: int) -> int:
    """Frames the model gives for ``num_samples`` samples."""
    return int(model.output_lengths(torch.tensor([num_samples]))[0])


@torch.no_grad()
def windowed_features(
    model: nn.Module, wave: Tensor, layers: list[Any], chunk: ChunkConfig
) -> Iterator[Window]:
    """Features of ``layers`` (see :func:`speechvq.units.export.layer_features`) of one recording
    ``wave`` ``[S]``, window by window, in frame order (see the module docstring).

    Args:
        model: a wav2vec 2.0 or CTC model in eval mode.
        wave: ``[S]`` samples at 16 kHz, not normalised (this function does it with the
            recording's statistics when the model expects it).
        layers: layer numbers (0 = front end, l = block l) and/or ``"transformer_input"``.
        chunk: the window sizes.
    """
    audio = _windowed(model)
    m: Any = model
    stats = front_end_stats(model, wave)
    if stats.wave is not None:
        wave = _normalized(wave, stats.wave, audio.waveform_norm.eps)
    stride, field = audio.frame_stride, audio.receptive_field
    total = num_frames(model, wave.numel())
    per_chunk = max(1, round(chunk.chunk_s * SAMPLE_RATE / stride))
    context = round(chunk.context_s * SAMPLE_RATE / stride)
    depth = max((0 if x in (0, TRANSFORMER_INPUT) else int(x)) for x in layers)
    needs_context = any(x != 0 for x in layers)
    for first in range(0, total, per_chunk):
        last = min(total, first + per_chunk)
        w0, w1 = max(0, first - context), min(total, last + context)
        samples = wave[w0 * stride : min(wave.numel(), (w1 - 1) * stride + field)]
        features = _front_end(model, samples, stats)[: w1 - w0]  # (W, C)
        out: dict[Any, Tensor] = {}
        if 0 in layers:
            out[0] = features[first - w0 : last - w0]
        if needs_context:
            x, _ = m.feature_projection(features[None])
            hidden = m.context(x, None, num_layers=depth).hidden_states
            for layer in layers:
                if layer != 0:
                    index = 0 if layer == TRANSFORMER_INPUT else int(layer)
                    out[layer] = hidden[index][0, first - w0 : last - w0]
        yield Window(first_frame=first, layers=out)
