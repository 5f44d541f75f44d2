"""Model components."""

from speechvq.models.context import ContextNetwork, build_context_network
from speechvq.models.encoder import ConvFeatureEncoder, build_feature_encoder, conv_output_lengths
from speechvq.models.masking import compute_span_mask, sample_distractors
from speechvq.models.protocol import AudioModel, QuantizingModel
from speechvq.models.quantizer import GumbelVectorQuantizer, QuantizerOutput, VectorQuantizer, build_quantizer
from speechvq.models.randomness import Draws
from speechvq.models.wav2vec2 import Wav2Vec2Model, Wav2Vec2Output, build_wav2vec2
