"""Model configuration dataclasses and presets.

Each field is documented once, by the attribute docstring directly under it; the fairseq name of
the option is given where it differs. Presets are written as deltas of :func:`wav2vec2_base`.

The package: :mod:`.model` (wav2vec 2.0 and its parts), :mod:`.vq_wav2vec`, :mod:`.presets`,
:mod:`.waveform` (input normalisation), :mod:`.limits` (bounds on untrusted configs) and :mod:`.plain` (dict conversion); everything is
re-exported here, so ``from speechvq.config import X`` is the import to use.
"""

from __future__ import annotations

from speechvq.config.limits import MAX_LAYERS, MAX_PARAMETERS, MAX_SIZE, _check_probabilities, _check_sizes
from speechvq.config.model import (
    BASE_CONV_LAYERS,
    ContextConfig,
    ConvSpec,
    FeatureEncoderConfig,
    KMeansQuantizerConfig,
    LossConfig,
    MaskConfig,
    QuantizerConfig,
    Wav2Vec2Config,
    _QuantizedModelConfig,
    approx_parameters,
)
from speechvq.config.plain import to_plain
from speechvq.config.presets import (
    PRESETS,
    finetune_mask,
    preset,
    wav2vec2_base,
    wav2vec2_large,
    wav2vec2_small,
    wav2vec2_tiny,
)
from speechvq.config.vq_wav2vec import (
    VQ_WAV2VEC_AGGREGATOR_LAYERS,
    VQ_WAV2VEC_CONV_LAYERS,
    VQ_WAV2VEC_PRESETS,
    VqWav2VecConfig,
    vq_wav2vec_gumbel,
    vq_wav2vec_kmeans,
)
from speechvq.config.waveform import FAIRSEQ_NORMALIZE_EPS, TRANSFORMERS_NORMALIZE_EPS, WaveformNorm
