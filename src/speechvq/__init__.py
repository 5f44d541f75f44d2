"""speechvq: self-supervised speech pretraining in the vq-wav2vec / wav2vec 2.0 family."""

from speechvq.config import (
    Wav2Vec2Config,
    preset,
    wav2vec2_base,
    wav2vec2_large,
    wav2vec2_small,
    wav2vec2_tiny,
)
from speechvq.models.wav2vec2 import Wav2Vec2Model, Wav2Vec2Output, build_wav2vec2

__version__ = "0.1.0"
