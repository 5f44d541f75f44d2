"""How a model wants its input waveforms normalised: the one description every path reads."""

from __future__ import annotations

from dataclasses import dataclass

FAIRSEQ_NORMALIZE_EPS = 1e-5
"""eps of fairseq's ``normalize`` (``F.layer_norm`` over the waveform) and of
:func:`speechvq.data.audio.normalize_waveform`: what pretraining data with ``normalize`` saw."""

TRANSFORMERS_NORMALIZE_EPS = 1e-7
"""eps of transformers' ``Wav2Vec2FeatureExtractor(do_normalize=True)``: what a CTC model that
normalises inside its forward (``CtcConfig.normalize_waveform``) saw in fine-tuning, so that its
transformers export gives the same outputs."""


@dataclass(frozen=True)
class WaveformNorm:
    """Per-utterance zero mean, unit variance over the valid samples, ``(x - mean) / sqrt(var + eps)``
    with the population variance, or nothing.

    Every model config exposes one as ``waveform_norm`` (derived from its fields); it is the
    single source that training data, unit export, feature extraction, long-form windows,
    transcription and the transformers export read, each with the eps the model was trained with.
    """

    enabled: bool
    """Whether the model expects normalised waveforms."""

    eps: float = FAIRSEQ_NORMALIZE_EPS
    """Added to the variance."""

    in_forward: bool = False
    """The model's forward normalises by itself (callers pass raw waveforms); otherwise whoever
    feeds the model normalises first."""

    @property
    def by_caller(self) -> bool:
        """Whether the caller must normalise before the model's forward."""
        return self.enabled and not self.in_forward
