"""fairseq model configs <-> speechvq configs, field by field, both ways.

fairseq's ``cfg.model`` (or a legacy ``args`` Namespace, as plain dicts) maps to
:class:`~speechvq.config.Wav2Vec2Config` and :class:`~speechvq.config.VqWav2VecConfig`; options
speechvq does not implement are refused by name. Layer lists such as
``"[(512, 10, 5)] + [(512, 3, 2)] * 4"`` are parsed without ``eval``.
"""

from __future__ import annotations

import ast
import logging
from typing import Any

from speechvq.config import (
    ContextConfig,
    FeatureEncoderConfig,
    KMeansQuantizerConfig,
    LossConfig,
    MaskConfig,
    QuantizerConfig,
    VqWav2VecConfig,
    Wav2Vec2Config,
)
from speechvq.errors import UserInputError

logger = logging.getLogger(__name__)

# -- configs -----------------------------------------------------------------------------------


MAX_LAYER_SPEC_CHARS = 10_000
"""Longest layer-list string read from a checkpoint config."""
MAX_LAYER_SPECS = 256
"""Most layers a layer-list string may describe (fairseq's largest models have 7 conv layers)."""
MAX_LAYER_VALUE = 1 << 20
"""Largest channel count, kernel or stride in a layer-list string (and largest factor of ``*``)."""


def _eval_layers(text: Any, name: str) -> tuple[tuple[int, int, int], ...]:
    """Parse fairseq's layer-list strings such as ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``
    without ``eval``: only list/tuple literals of ints, ``+`` and ``*`` are accepted.

    Parsing is bounded before anything is built: the string's length, every integer, and the
    length of every list (checked before a ``*`` repeats it), so a crafted ``"[...] * 10**9"`` or
    ``"[...] * 1000000000"`` is refused instead of allocating without bound.
    """
    if isinstance(text, (list, tuple)):
        text = repr(list(text))  # the same bounds for lists given as values

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            if not 0 <= node.value <= MAX_LAYER_VALUE:
                raise ValueError(f"integer {node.value} is outside [0, {MAX_LAYER_VALUE}]")
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            if len(node.elts) > MAX_LAYER_SPECS:
                raise ValueError(f"a literal of more than {MAX_LAYER_SPECS} items")
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                if isinstance(left, int) != isinstance(right, int):
                    raise ValueError("'+' of a number and a list")
                result = left + right
            else:
                seq, count = (left, right) if isinstance(right, int) else (right, left)
                if not isinstance(count, int):
                    raise ValueError("'*' of two lists")
                if isinstance(seq, int):
                    result = seq * count
                elif len(seq) * count > MAX_LAYER_SPECS:
                    raise ValueError(
                        f"'* {count}' makes {len(seq) * count} layers, more than {MAX_LAYER_SPECS}"
                    )
                else:
                    result = seq * count
            if isinstance(result, int) and result > MAX_LAYER_VALUE:
                raise ValueError(f"integer {result} is outside [0, {MAX_LAYER_VALUE}]")
            if not isinstance(result, int) and len(result) > MAX_LAYER_SPECS:
                raise ValueError(f"more than {MAX_LAYER_SPECS} layers")
            return result
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")

    shown = repr(text) if len(str(text)) <= 120 else repr(str(text)[:120]) + "..."
    try:
        if len(str(text)) > MAX_LAYER_SPEC_CHARS:
            raise ValueError(f"longer than {MAX_LAYER_SPEC_CHARS} characters")
        layers = ev(ast.parse(str(text), mode="eval"))
        specs = tuple((int(c), int(k), int(s)) for c, k, s in layers)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as err:
        raise UserInputError(
            f"fairseq `{name}` must be a list of at most {MAX_LAYER_SPECS} (dim, kernel, stride), "
            f"but is {shown} instead ({type(err).__name__}: {err})"
        ) from None
    return specs


def _loss_weights(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            raise UserInputError(
                f"fairseq `loss_weights` must be a list of numbers, but is {value!r}"
            ) from None
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _require(model: dict[str, Any], checks: dict[str, Any]) -> None:
    """Refuse architecture options speechvq does not implement."""
    bad = [f"{k}={model[k]!r} (needs {v!r})" for k, v in checks.items() if k in model and model[k] != v]
    if bad:
        raise UserInputError(f"fairseq checkpoint uses options speechvq does not implement: {', '.join(bad)}")


def wav2vec2_config_from_fairseq(
    model: dict[str, Any], criterion: dict[str, Any] | None = None
) -> Wav2Vec2Config:
    """Map fairseq ``Wav2Vec2Config`` fields (plain dict) to a :class:`Wav2Vec2Config`."""
    _require(
        model,
        {
            "activation_fn": "gelu",
            "layer_type": "transformer",
            "quantize_input": False,
            "target_glu": False,
            "pos_conv_depth": 1,
        },
    )
    get = model.get
    dim = int(get("encoder_embed_dim", 768))
    final_dim = int(get("final_dim", 0)) or dim
    latent_dim = int(get("latent_dim", 0)) or final_dim
    weights = _loss_weights((criterion or {}).get("loss_weights")) or [0.1, 10.0]
    weights = ([*weights, 0.0, 0.0])[:2]
    return Wav2Vec2Config(
        encoder=FeatureEncoderConfig(
            conv_layers=_eval_layers(
                get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"),
                "conv_feature_layers",
            ),
            norm_mode="layer_norm" if get("extractor_mode", "default") == "layer_norm" else "group_norm",
            conv_bias=bool(get("conv_bias", False)),
            grad_mult=float(get("feature_grad_mult", 1.0)),
        ),
        quantizer=QuantizerConfig(
            num_codebooks=int(get("latent_groups", 2)),
            codebook_size=int(get("latent_vars", 320)),
            codevector_dim=latent_dim,
            temperature=tuple(get("latent_temp", (2.0, 0.5, 0.999995))),  # type: ignore[arg-type]
            dropout_p=float(get("dropout_features", 0.0)),
            weight_proj_depth=int(get("quantizer_depth", 1)),
            weight_proj_factor=int(get("quantizer_factor", 3)),
        ),
        mask=MaskConfig(
            mask_prob=float(get("mask_prob", 0.65)),
            mask_length=int(get("mask_length", 10)),
            require_same_masks=bool(get("require_same_masks", True)),
            channel_prob=float(get("mask_channel_prob", 0.0)),
            channel_length=int(get("mask_channel_length", 10)),
        ),
        context=ContextConfig(
            dim=dim,
            num_layers=int(get("encoder_layers", 12)),
            num_heads=int(get("encoder_attention_heads", 12)),
            ffn_dim=int(get("encoder_ffn_embed_dim", 3072)),
            layer_norm_first=bool(get("layer_norm_first", False)),
            pos_conv_kernel=int(get("conv_pos", 128)),
            pos_conv_groups=int(get("conv_pos_groups", 16)),
            dropout_p=float(get("dropout", 0.1)),
            attention_dropout_p=float(get("attention_dropout", 0.1)),
            activation_dropout_p=float(get("activation_dropout", 0.0)),
            layer_drop_p=float(get("encoder_layerdrop", 0.0)),
        ),
        loss=LossConfig(
            num_negatives=int(get("num_negatives", 100)),
            logit_temp=float(get("logit_temp", 0.1)),
            diversity_weight=weights[0],
            feature_penalty_weight=weights[1],
        ),
        final_dim=final_dim,
        feature_dropout_p=float(get("dropout_input", 0.0)),
    )


def vq_wav2vec_config_from_fairseq(
    model: dict[str, Any], criterion: dict[str, Any] | None = None
) -> VqWav2VecConfig:
    """Map fairseq ``Wav2VecConfig`` (vq-wav2vec) fields to a :class:`VqWav2VecConfig`."""
    _require(model, {"aggregator": "cnn", "project_features": "none", "non_affine_group_norm": False})
    get = model.get
    for option, harmless in (("infonce", False), ("cross_sample_negatives", 0), ("sample_distance", None)):
        if get(option, harmless) not in (harmless, None) and get(option) != harmless:
            logger.warning(
                "fairseq option %s=%r only affects training; speechvq trains without it", option, get(option)
            )
    encoder_layers = _eval_layers(get("conv_feature_layers"), "conv_feature_layers")
    embed = encoder_layers[-1][0]
    vq_dim = int(get("vq_dim", 0) or 0) or embed
    weights = _loss_weights(get("loss_weights", (criterion or {}).get("loss_weights")))
    weight = weights[0] if weights else 0.0
    offset = get("offset", "auto")
    groups, num_vars = int(get("vq_groups", 2)), int(get("vq_vars", 320))
    return VqWav2VecConfig(
        encoder_layers=encoder_layers,
        aggregator_layers=_eval_layers(get("conv_aggregator_layers"), "conv_aggregator_layers"),
        activation=str(get("activation", "relu")),  # type: ignore[arg-type]
        log_compression=bool(get("log_compression", False)),
        encoder_skip_connections=bool(get("skip_connections_feat", False)),
        aggregator_skip_connections=bool(get("skip_connections_agg", False)),
        residual_scale=float(get("residual_scale", 0.5)),
        aggregator_conv_bias=not bool(get("no_conv_bias", False)),
        aggregator_zero_pad=bool(get("agg_zero_pad", False)),
        quantizer_type=str(get("vq_type")),  # type: ignore[arg-type]
        quantizer=QuantizerConfig(
            num_codebooks=groups,
            codebook_size=num_vars,
            codevector_dim=vq_dim,
            temperature=tuple(get("vq_temp", (2.0, 0.5, 0.999995))),  # type: ignore[arg-type]
            weight_proj_depth=int(get("vq_depth", 1)),
            weight_proj_factor=2,
            combine_groups=bool(get("combine_groups", False)),
        ),
        kmeans=KMeansQuantizerConfig(
            num_codebooks=groups,
            codebook_size=num_vars,
            codevector_dim=vq_dim,
            combine_groups=bool(get("combine_groups", False)),
            gamma=float(get("vq_gamma", 0.25)),
            loss_weight=weight,
        ),
        prediction_steps=int(get("prediction_steps", 12)),
        num_negatives=int(get("num_negatives", 10)),
        offset=None if str(offset) == "auto" else int(offset),
        dropout_p=float(get("dropout", 0.0)),
        feature_dropout_p=float(get("dropout_features", 0.0)),
        aggregator_dropout_p=float(get("dropout_agg", 0.0)),
        gumbel_diversity_weight=weight,
    )


# -- export ------------------------------------------------------------------------------------


def _layers_string(layers: tuple[tuple[int, int, int], ...]) -> str:
    return "[" + ", ".join(f"({c}, {k}, {s})" for c, k, s in layers) + "]"


def fairseq_wav2vec2_config(cfg: Wav2Vec2Config) -> dict[str, Any]:
    """The fairseq ``model`` section (``_name: wav2vec2``) describing ``cfg``."""
    q, ctx, enc = cfg.quantizer, cfg.context, cfg.encoder
    return {
        "_name": "wav2vec2",
        "extractor_mode": "layer_norm" if enc.norm_mode == "layer_norm" else "default",
        "conv_feature_layers": _layers_string(enc.conv_layers),
        "conv_bias": enc.conv_bias,
        "feature_grad_mult": enc.grad_mult,
        "encoder_layers": ctx.num_layers,
        "encoder_embed_dim": ctx.dim,
        "encoder_ffn_embed_dim": ctx.ffn_dim,
        "encoder_attention_heads": ctx.num_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "layer_norm_first": ctx.layer_norm_first,
        "conv_pos": ctx.pos_conv_kernel,
        "conv_pos_groups": ctx.pos_conv_groups,
        "pos_conv_depth": 1,
        "dropout": ctx.dropout_p,
        "attention_dropout": ctx.attention_dropout_p,
        "activation_dropout": ctx.activation_dropout_p,
        "encoder_layerdrop": ctx.layer_drop_p,
        "dropout_input": cfg.feature_dropout_p,
        "dropout_features": q.dropout_p,
        "final_dim": cfg.final_dim,
        "quantize_targets": True,
        "quantize_input": False,
        "latent_vars": q.codebook_size,
        "latent_groups": q.num_codebooks,
        "latent_dim": q.codevector_dim,
        "latent_temp": list(q.temperature),
        "quantizer_depth": q.weight_proj_depth,
        "quantizer_factor": q.weight_proj_factor,
        "mask_prob": cfg.mask.mask_prob,
        "mask_length": cfg.mask.mask_length,
        "mask_selection": "static",
        "require_same_masks": cfg.mask.require_same_masks,
        "mask_channel_prob": cfg.mask.channel_prob,
        "mask_channel_length": cfg.mask.channel_length,
        "num_negatives": cfg.loss.num_negatives,
        "logit_temp": cfg.loss.logit_temp,
        "cross_sample_negatives": 0,
        "codebook_negatives": 0,
    }
