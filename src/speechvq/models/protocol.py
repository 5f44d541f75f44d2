"""What every speechvq audio model offers the code that runs it.

Unit export, feature extraction, long-form windows, transcription and the benchmarks read a model
only through :class:`AudioModel` (and :class:`QuantizingModel` for quantizer codes), never by its
class. Layers are numbered alike for every model: 0 is the front end's output (the conv or
log-mel feature encoder), ``l`` (1-based) the output of Transformer block ``l`` (wav2vec 2.0, CTC)
or, for vq-wav2vec, 1 the aggregator's output; :data:`TRANSFORMER_INPUT` is the input of block 1
(models with a Transformer only).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from speechvq.config.waveform import WaveformNorm
from speechvq.models.quantizer import QuantizerOutput, VectorQuantizer

TRANSFORMER_INPUT = "transformer_input"
"""The layer before Transformer block 1: the projected features after the positional convolution
and its LayerNorm (transformers' ``hidden_states[0]``)."""

Layer = int | str
"""A layer of :meth:`AudioModel.layer_features`: a number, or :data:`TRANSFORMER_INPUT`."""


@runtime_checkable
class AudioModel(Protocol):
    """A model from 16 kHz waveforms to frames."""

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive output frames."""
        ...

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees: the fewest an utterance must hold to give a frame."""
        ...

    @property
    def waveform_norm(self) -> WaveformNorm:
        """The input normalisation the model was trained with (its config's ``waveform_norm``)."""
        ...

    @property
    def num_layers(self) -> int:
        """The highest layer number :meth:`layer_features` accepts."""
        ...

    @property
    def has_transformer(self) -> bool:
        """Whether the model has a Transformer context network: :data:`TRANSFORMER_INPUT` is a
        layer, and long recordings can run in windows (:mod:`speechvq.units.longform`)."""
        ...

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``[B]`` samples -> ``[B]`` frames."""
        ...

    def layer_features(
        self, waveforms: Tensor, lengths: Tensor | None, layer: Layer
    ) -> tuple[Tensor, Tensor]:
        """Unmasked features ``[B, T, D]`` of ``layer`` and frame lengths ``[B]`` of
        ``waveforms`` ``[B, S]`` (normalised as :attr:`waveform_norm` says, if the caller must)."""
        ...


@runtime_checkable
class QuantizingModel(AudioModel, Protocol):
    """An :class:`AudioModel` with a quantizer whose codes are units."""

    quantizer: VectorQuantizer

    def quantize(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[QuantizerOutput, Tensor]:
        """Quantizer output (codes ``[B, T, G]``) of unmasked input, and frame lengths ``[B]``."""
        ...

    def quantize_features(self, features: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput:
        """Quantizer output of front-end (layer 0) features ``[B, T, C]``."""
        ...


class FeatureEncoderGeometry:
    """The :class:`AudioModel` members that follow from a model's ``feature_encoder`` and its
    config's ``waveform_norm``: mixed into every model with a front end, before ``nn.Module``."""

    feature_encoder: Any
    cfg: Any

    @property
    def frame_stride(self) -> int:
        return int(self.feature_encoder.frame_stride)

    @property
    def receptive_field(self) -> int:
        return int(self.feature_encoder.receptive_field)

    @property
    def waveform_norm(self) -> WaveformNorm:
        return self.cfg.waveform_norm

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``[B]`` samples -> ``[B]`` frames."""
        return self.feature_encoder.output_lengths(lengths)


def check_layer(model: AudioModel, layer: Layer) -> None:
    """Raise ``ValueError`` unless ``model`` has ``layer``."""
    if layer == TRANSFORMER_INPUT:
        if not model.has_transformer:
            raise ValueError(f"`layer` {TRANSFORMER_INPUT!r} needs a Transformer, but this model has none.")
        return
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= model.num_layers:
        raise ValueError(
            f"`layer` must be in [0, {model.num_layers}] or {TRANSFORMER_INPUT!r}, but is {layer!r} instead."
        )
