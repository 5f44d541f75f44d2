"""Export of a speechvq vq-wav2vec model to a fairseq checkpoint (fairseq's ``wav2vec`` model with
``vq_type`` set), loadable by ``fairseq.checkpoint_utils.load_model_ensemble_and_task``.

The weights are renamed by :data:`~speechvq.interop.fairseq.VQ_WAV2VEC_KEY_MAP` read right to left;
the config becomes fairseq's ``Wav2VecConfig`` fields. The speechvq config also rides along in
``extra_state``, so speechvq -> fairseq -> speechvq is lossless (EMA / dead-code settings of the
k-means quantizer included, which fairseq does not have: it would fine-tune such a model with its
plain k-means update, and computes the same outputs).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from speechvq.config import VqWav2VecConfig
from speechvq.errors import UserInputError
from speechvq.interop.keymap import KeyTable, rename_keys

logger = logging.getLogger(__name__)


def _layers(layers: tuple[tuple[int, int, int], ...]) -> str:
    return "[" + ", ".join(f"({c}, {k}, {s})" for c, k, s in layers) + "]"


def fairseq_vq_wav2vec_config(cfg: VqWav2VecConfig) -> dict[str, Any]:
    """The fairseq ``model`` section (``_name: wav2vec``) describing ``cfg``.

    Raises:
        UserInputError: for settings fairseq cannot represent.
    """
    if cfg.encoder_kind != "conv":
        raise UserInputError(
            f"`encoder_kind` must be 'conv' to export to fairseq (it has no log-mel front end), "
            f"but is {cfg.encoder_kind!r} instead."
        )
    embed = cfg.encoder_layers[-1][0]
    kmeans = cfg.quantizer_type == "kmeans"
    vq_dim = cfg.kmeans.codevector_dim if kmeans else cfg.quantizer.codevector_dim
    groups = cfg.kmeans.num_codebooks if kmeans else cfg.quantizer.num_codebooks
    num_vars = cfg.kmeans.codebook_size if kmeans else cfg.quantizer.codebook_size
    combine = cfg.kmeans.combine_groups if kmeans else cfg.quantizer.combine_groups
    if kmeans and vq_dim != embed:
        raise UserInputError(
            f"`kmeans.codevector_dim` must equal the encoder width ({embed}) to export to fairseq, "
            f"but is {vq_dim} instead."
        )
    if not kmeans and cfg.quantizer.weight_proj_depth > 1 and cfg.quantizer.weight_proj_factor != 2:
        raise UserInputError(
            "`quantizer.weight_proj_factor` must be 2 to export to fairseq (it hard-codes 2), "
            f"but is {cfg.quantizer.weight_proj_factor} instead."
        )
    if kmeans and (cfg.kmeans.ema_decay is not None or cfg.kmeans.dead_code_threshold):
        logger.warning(
            "fairseq's k-means quantizer has no EMA codebook or dead-code reset: the exported model "
            "computes the same outputs, but fairseq would train it with plain k-means updates"
        )
    weight = cfg.kmeans.loss_weight if kmeans else cfg.gumbel_diversity_weight
    return {
        "_name": "wav2vec",
        "prediction_steps": cfg.prediction_steps,
        "sample_distance": None,
        "cross_sample_negatives": 0,
        "num_negatives": cfg.num_negatives,
        "conv_feature_layers": _layers(cfg.encoder_layers),
        "conv_aggregator_layers": _layers(cfg.aggregator_layers),
        "dropout": cfg.dropout_p,
        "dropout_features": cfg.feature_dropout_p,
        "dropout_agg": cfg.aggregator_dropout_p,
        "aggregator": "cnn",
        "gru_dim": 512,
        "no_conv_bias": not cfg.aggregator_conv_bias,
        "agg_zero_pad": cfg.aggregator_zero_pad,
        "skip_connections_feat": cfg.encoder_skip_connections,
        "skip_connections_agg": cfg.aggregator_skip_connections,
        "residual_scale": cfg.residual_scale,
        "log_compression": cfg.log_compression,
        "balanced_classes": False,
        "project_features": "none",
        "non_affine_group_norm": False,
        "offset": "auto" if cfg.offset is None else str(cfg.offset),
        "activation": cfg.activation,
        "vq_type": cfg.quantizer_type,
        "vq_vars": num_vars,
        "vq_groups": groups,
        "vq_dim": vq_dim,
        "vq_depth": cfg.quantizer.weight_proj_depth,
        "combine_groups": combine,
        "vq_temp": list(cfg.quantizer.temperature),
        "vq_gamma": cfg.kmeans.gamma,
        "infonce": False,
        "loss_weights": [weight] if weight else None,
    }


def vq_wav2vec_state_to_fairseq(
    state: dict[str, Tensor], cfg: VqWav2VecConfig, table: KeyTable
) -> dict[str, Tensor]:
    """speechvq vq-wav2vec weights (``_SPEECHVQ_ONLY`` buffers removed) renamed to fairseq's."""
    depth = cfg.quantizer.weight_proj_depth
    # right-to-left, the last Gumbel projection layer has one fairseq name per depth
    last = "vector_quantizer.weight_proj.{i}." if depth > 1 else "vector_quantizer.weight_proj."
    reverse = [(fs, sv) for fs, sv in table if not (sv == "quantizer.weight_proj." and fs != last)]
    names = rename_keys(list(state), reverse, reverse=True)
    out = {}
    for key, value in state.items():
        name = names[key]
        if name.startswith("vector_quantizer.weight_proj.{i}."):
            name = name.replace("{i}", str(depth - 1))
        if key == "quantizer.codebook":  # speechvq [G', V, d] -> fairseq [V, G', d]
            value = value.transpose(0, 1).contiguous()
        out[name] = value
    return out
