"""Import of fairseq checkpoints (wav2vec 2.0, wav2vec 2.0 CTC, vq-wav2vec) and export of
wav2vec 2.0 and vq-wav2vec back to fairseq-loadable checkpoints.

fairseq checkpoints are pickles. :func:`load_fairseq_checkpoint` reads them with
``torch.load(weights_only=True)`` plus an explicit allow-list of the few plain types they hold
(``argparse.Namespace`` for argparse-era checkpoints, OmegaConf containers for some hydra-era
ones, numpy scalars in training metadata); anything else, such as a pickle that would call
``os.system``, is refused before it can run. Weights are renamed by the template tables below
(``{i}`` stands for a layer index), never by branches in model code; configs are mapped field by
field from the checkpoint's ``cfg`` (or legacy ``args``).

Entry points: :func:`import_fairseq` (path -> speechvq model), :func:`fairseq_to_speechvq`
(loaded checkpoint -> model), :func:`speechvq_to_fairseq` (wav2vec 2.0 or vq-wav2vec model ->
checkpoint dict) and :func:`save_fairseq_checkpoint` (model -> ``.pt`` file).
"""

from __future__ import annotations

import argparse
import ast
import collections
import logging
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
from speechvq.files import check_output_file, require_file, writing
from speechvq.interop.keymap import KeyTable, rename_keys
from speechvq.models.kmeans_quantizer import KMeansVectorQuantizer

logger = logging.getLogger(__name__)

WAV2VEC2_KEY_MAP: KeyTable = [
    # (fairseq Wav2Vec2Model prefix, speechvq Wav2Vec2Model prefix); first match wins.
    ("feature_extractor.conv_layers.{i}.0.", "feature_encoder.layers.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.2.1.", "feature_encoder.layers.{i}.norm."),  # layer_norm mode
    ("feature_extractor.conv_layers.{i}.2.", "feature_encoder.layers.{i}.norm."),  # default (group norm)
    ("layer_norm.", "feature_projection.layer_norm."),
    ("post_extract_proj.", "feature_projection.linear."),
    ("mask_emb", "mask_embedding"),
    ("quantizer.vars", "quantizer.codevectors"),
    ("quantizer.weight_proj.{i}.0.", "quantizer.hidden_proj.{i}.0."),
    ("quantizer.weight_proj.", "quantizer.weight_proj."),
    ("project_q.", "project_q."),
    ("final_proj.", "project_hid."),
    ("encoder.pos_conv.0.weight_g", "context.pos_conv.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "context.pos_conv.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv.0.", "context.pos_conv.conv."),
    ("encoder.layers.{i}.self_attn.", "context.layers.{i}.attention."),
    ("encoder.layers.{i}.self_attn_layer_norm.", "context.layers.{i}.attention_norm."),
    ("encoder.layers.{i}.fc1.", "context.layers.{i}.feed_forward.linear1."),
    ("encoder.layers.{i}.fc2.", "context.layers.{i}.feed_forward.linear2."),
    ("encoder.layers.{i}.final_layer_norm.", "context.layers.{i}.ffn_norm."),
    ("encoder.layer_norm.", "context.layer_norm."),
]

CTC_KEY_MAP: KeyTable = [
    ("w2v_encoder.proj.", "lm_head."),
    *[("w2v_encoder.w2v_model." + fs, sv) for fs, sv in WAV2VEC2_KEY_MAP],
]

VQ_WAV2VEC_KEY_MAP: KeyTable = [
    # (fairseq Wav2VecModel prefix, speechvq VqWav2VecModel prefix)
    ("feature_extractor.conv_layers.{i}.0.", "feature_encoder.blocks.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.2.", "feature_encoder.blocks.{i}.norm."),
    ("vector_quantizer.vars", "quantizer.codevectors"),
    ("vector_quantizer.weight_proj.{i}.0.", "quantizer.hidden_proj.{i}.0."),
    ("vector_quantizer.weight_proj.{i}.", "quantizer.weight_proj."),  # last layer of a deep projection
    ("vector_quantizer.weight_proj.", "quantizer.weight_proj."),
    ("vector_quantizer.embedding", "quantizer.codebook"),
    ("vector_quantizer.projection.0.", "quantizer.input_proj."),
    ("vector_quantizer.projection.1.", "quantizer.input_norm."),
    ("feature_aggregator.conv_layers.{i}.1.", "aggregator.blocks.{i}.conv."),  # index 0 is the padding
    ("feature_aggregator.conv_layers.{i}.3.", "aggregator.blocks.{i}.norm."),
    ("feature_aggregator.residual_proj.{i}.", "aggregator.residual_proj.{i}."),
    ("wav2vec_predictions.project_to_steps.", "predictor.project_to_steps."),
]

# Tensors whose layout differs: fairseq's k-means codebook is [V, G', d], speechvq's [G', V, d].
_TO_SPEECHVQ: dict[str, Callable[[Tensor], Tensor]] = {
    "quantizer.codebook": lambda t: t.transpose(0, 1).contiguous(),
}

# speechvq state that fairseq has no slot for; it keeps its initial value on import.
_SPEECHVQ_ONLY = ("quantizer.num_updates", "quantizer.cluster_size", "quantizer.embed_avg", "num_updates")


# -- safe loading ------------------------------------------------------------------------------


def _allowed_globals() -> list[Any]:
    """The allow-list: plain containers that fairseq checkpoints hold, nothing that runs code."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        scalar = core.multiarray.scalar
        allowed += [
            (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar"),
            np.dtype,
        ]
        allowed += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    except (ImportError, AttributeError):  # pragma: no cover - numpy is a dependency
        pass
    try:
        import typing

        from omegaconf import DictConfig, ListConfig, nodes
        from omegaconf.base import ContainerMetadata, Metadata

        # defaultdict is harmless here: its factory is itself a global that must be on this list.
        allowed += [DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any, collections.defaultdict]
        allowed += [dict, list, tuple, set, int, float, str, bool]
        allowed += [
            getattr(nodes, name)
            for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode")
            if hasattr(nodes, name)
        ]
    except ImportError:
        pass
    return allowed


def load_fairseq_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a fairseq checkpoint without running any code from it.

    Args:
        path: a fairseq ``.pt`` file.

    Returns:
        The checkpoint dict (``model``, and ``cfg`` and/or ``args``); OmegaConf containers in it
        are turned into plain dicts and lists.

    Raises:
        UserInputError: if the file is missing, is not a checkpoint, or holds an object outside
            the allow-list (a crafted pickle is refused before anything in it runs).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such fairseq checkpoint")
    require_file(path, "fairseq checkpoint")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a refused global: the bytes are no pickle torch can read
            reason = next((ln.strip() for ln in reversed(str(err).splitlines()) if ln.strip()), "")
            raise UserInputError(f"{path}: not a readable torch checkpoint ({reason[:200]})") from None
        what = found.group(1)
        hint = ""
        if any(name.startswith("omegaconf.") for name in _unsafe_globals(path)):
            try:
                import omegaconf  # noqa: F401
            except ImportError:
                hint = " (it holds OmegaConf objects: install omegaconf, speechvq[fairseq], to read it)"
        raise UserInputError(
            f"{path}: refused to load: the pickle references {what}, which is not on speechvq's "
            f"allow-list of safe checkpoint types{hint}; speechvq never unpickles arbitrary objects"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as err:
        raise UserInputError(f"{path}: not a readable torch checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserInputError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    if state.get("cfg") is not None:
        state["cfg"] = _plain(state["cfg"])
    return state


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the globals a checkpoint references beyond torch's defaults (scanned, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a scan failure only costs the hint
        return []


def _plain(value: Any) -> Any:
    """OmegaConf containers and Namespaces -> plain dicts and lists, recursively."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    except ImportError:
        pass
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


# -- key maps ----------------------------------------------------------------------------------


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


def checkpoint_sections(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model, task, criterion) settings of a checkpoint, from ``cfg`` or legacy ``args``."""
    cfg = ckpt.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"], cfg.get("task") or {}, cfg.get("criterion") or {}
    args = ckpt.get("args")
    if args is not None:
        flat = _plain(args)
        model = dict(flat)
        model.setdefault("_name", flat.get("arch"))
        return model, flat, flat
    raise UserInputError("fairseq checkpoint has neither `cfg` nor `args`; its architecture is unknown")


def fairseq_model_kind(ckpt: dict[str, Any]) -> str:
    """``wav2vec2``, ``wav2vec2_ctc`` or ``vq_wav2vec``."""
    model, _, _ = checkpoint_sections(ckpt)
    name = str(model.get("_name") or model.get("arch") or "")
    if name.startswith("wav2vec2") and name != "wav2vec2_laser":
        return "wav2vec2"
    if name in ("wav2vec_ctc", "wav2vec2_ctc"):
        return "wav2vec2_ctc"
    if name == "wav2vec":
        vq = model.get("vq_type")
        if vq not in ("gumbel", "kmeans"):
            raise UserInputError(
                f"fairseq `vq_type` must be 'gumbel' or 'kmeans' (vq-wav2vec), but is {vq!r} instead: "
                "wav2vec 1.0 without a quantizer is not supported"
            )
        return "vq_wav2vec"
    raise UserInputError(
        f"fairseq model `{name}` is not supported; supported: wav2vec2, wav2vec_ctc, wav2vec (vq-wav2vec)"
    )


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


# -- import ------------------------------------------------------------------------------------


def _load_renamed(model: nn.Module, state: dict[str, Tensor], table: KeyTable, source: str) -> None:
    """Rename ``state`` through ``table``, fix layouts, and load it into ``model`` strictly (only
    speechvq-only buffers may be missing)."""
    try:
        names = rename_keys(list(state), table)
    except KeyError as err:
        raise UserInputError(f"{source}: unexpected fairseq parameter: {err.args[0]}") from None
    renamed = {}
    for key, value in state.items():
        new = names[key]
        renamed[new] = _TO_SPEECHVQ[new](value) if new in _TO_SPEECHVQ else value
    own = model.state_dict()
    missing = sorted(k for k in own if k not in renamed and not k.endswith(_SPEECHVQ_ONLY))
    unexpected = sorted(k for k in renamed if k not in own)
    mismatched = sorted(k for k in renamed if k in own and own[k].shape != renamed[k].shape)
    if missing or unexpected or mismatched:
        raise UserInputError(
            f"{source}: weights do not match the architecture in its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]})"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in renamed.items()}, strict=False)


def _num_updates(ckpt: dict[str, Any]) -> int:
    history = ckpt.get("optimizer_history") or []
    if history and isinstance(history[-1], dict):
        return int(history[-1].get("num_updates", 0) or 0)
    return 0


def _fill_identity_projection(model: nn.Module, state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """fairseq has no ``post_extract_proj`` when the encoder width equals the model dim: it is the
    identity, which speechvq's Linear reproduces exactly."""
    if f"{prefix}post_extract_proj.weight" in state:
        return state
    linear = model.get_submodule("feature_projection.linear")
    assert isinstance(linear, nn.Linear)
    if linear.in_features != linear.out_features:
        return state
    state = dict(state)
    state[f"{prefix}post_extract_proj.weight"] = torch.eye(linear.in_features)
    state[f"{prefix}post_extract_proj.bias"] = torch.zeros(linear.out_features)
    return state


def fairseq_to_speechvq(ckpt: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Build the speechvq model of a loaded fairseq checkpoint and copy its weights.

    Args:
        ckpt: the dict from :func:`load_fairseq_checkpoint`.
        source: name of the checkpoint, for error messages.

    Returns:
        A :class:`~speechvq.models.wav2vec2.Wav2Vec2Model`,
        :class:`~speechvq.models.ctc.CtcModel` or :class:`~speechvq.models.vq_wav2vec.VqWav2VecModel`
        in eval mode.

    Raises:
        UserInputError: for unsupported architectures or weights that do not match the config.
    """
    try:
        kind = fairseq_model_kind(ckpt)
        model_cfg, task_cfg, criterion_cfg = checkpoint_sections(ckpt)
    except UserInputError as err:
        raise UserInputError(f"{source}: {err}") from None
    state = {k: v for k, v in ckpt["model"].items() if isinstance(v, Tensor)}
    model: nn.Module
    try:
        if kind == "wav2vec2":
            from speechvq.models.wav2vec2 import build_wav2vec2

            if not model_cfg.get("quantize_targets", True):
                raise UserInputError(f"{source}: wav2vec 2.0 without quantized targets is not supported")
            embedded = (ckpt.get("extra_state") or {}).get("speechvq_config")
            if isinstance(embedded, dict):  # written by speechvq_to_fairseq: lossless round trip
                w2v_cfg = Wav2Vec2Config.from_dict(embedded)
            else:
                w2v_cfg = wav2vec2_config_from_fairseq(model_cfg, criterion_cfg)
            model = build_wav2vec2(w2v_cfg)
            state = _fill_identity_projection(model, state, "")
            _load_renamed(model, state, WAV2VEC2_KEY_MAP, source)
        elif kind == "wav2vec2_ctc":
            model = _ctc_from_fairseq(model_cfg, task_cfg, state, source)
        else:
            from speechvq.models.vq_wav2vec import build_vq_wav2vec

            embedded = (ckpt.get("extra_state") or {}).get("speechvq_config")
            if isinstance(embedded, dict):  # written by speechvq_to_fairseq: lossless round trip
                vq_cfg = VqWav2VecConfig.from_dict(embedded)
            else:
                vq_cfg = vq_wav2vec_config_from_fairseq(model_cfg, criterion_cfg)
            model = build_vq_wav2vec(vq_cfg)
            _load_renamed(model, state, VQ_WAV2VEC_KEY_MAP, source)
            quantizer = model.get_submodule("quantizer")
            if isinstance(quantizer, KMeansVectorQuantizer):
                with torch.no_grad():
                    quantizer.embed_avg.copy_(quantizer.codebook)
    except (TypeError, ValueError) as err:
        if isinstance(err, UserInputError):
            if str(err).startswith(f"{source}:"):
                raise
            raise UserInputError(f"{source}: {err}") from None
        raise UserInputError(f"{source}: unsupported fairseq config: {err}") from None
    set_num_updates = getattr(model, "set_num_updates_", None)
    if callable(set_num_updates):
        set_num_updates(_num_updates(ckpt))
    buffers = (ckpt.get("extra_state") or {}).get("speechvq_buffers")
    if isinstance(buffers, dict):  # written by speechvq_to_fairseq
        own = model.state_dict()
        known = {k: v for k, v in buffers.items() if k in own and own[k].shape == getattr(v, "shape", None)}
        model.load_state_dict(known, strict=False)
    return model.eval()


def _ctc_from_fairseq(
    model_cfg: dict[str, Any], task_cfg: dict[str, Any], state: dict[str, Tensor], source: str
) -> nn.Module:
    import dataclasses

    from speechvq.models.ctc import CtcConfig, build_ctc_model

    w2v_args = model_cfg.get("w2v_args")
    if w2v_args is None:
        raise UserInputError(
            f"{source}: the fine-tuned checkpoint does not embed its pretraining config (`w2v_args`); "
            "fairseq itself would need the pretrained checkpoint at `w2v_path` to rebuild it"
        )
    w2v_args = _plain(w2v_args)
    pre_model = w2v_args.get("model", w2v_args)
    pre = wav2vec2_config_from_fairseq(pre_model)
    get = model_cfg.get
    proj = state.get("w2v_encoder.proj.weight")
    if proj is None:
        raise UserInputError(f"{source}: no CTC output layer (w2v_encoder.proj) in the weights")
    context = dataclasses.replace(
        pre.context,
        dropout_p=float(get("dropout", 0.0)),
        attention_dropout_p=float(get("attention_dropout", 0.0)),
        activation_dropout_p=float(get("activation_dropout", 0.0)),
        layer_drop_p=float(get("layerdrop", 0.0)),
    )
    cfg = CtcConfig(
        encoder=dataclasses.replace(pre.encoder, grad_mult=float(get("feature_grad_mult", 0.0))),
        context=context,
        mask=MaskConfig(
            mask_prob=float(get("mask_prob", 0.5)),
            mask_length=int(get("mask_length", 10)),
            channel_prob=float(get("mask_channel_prob", 0.0)),
            channel_length=int(get("mask_channel_length", 10)),
        ),
        vocab_size=int(proj.shape[0]),
        blank_id=0,
        feature_dropout_p=float(get("dropout_input", 0.0)),
        final_dropout_p=float(get("final_dropout", 0.0)),
        freeze_updates=int(get("freeze_finetune_updates", 0)),
        normalize_waveform=bool(task_cfg.get("normalize", get("normalize", False))),
    )
    model = build_ctc_model(cfg)
    state = _fill_identity_projection(model, state, "w2v_encoder.w2v_model.")
    # Pretraining-only modules fairseq may have kept (it removes them when fine-tuning starts).
    pretraining_only = ("quantizer.", "project_q.", "final_proj.", "target_glu.")
    state = {
        k: v
        for k, v in state.items()
        if not k.removeprefix("w2v_encoder.w2v_model.").startswith(pretraining_only)
    }
    _load_renamed(model, state, CTC_KEY_MAP, source)
    return model


def import_fairseq(path: str | os.PathLike[str]) -> nn.Module:
    """Load a fairseq ``.pt`` safely and convert it to a speechvq model (eval mode)."""
    return fairseq_to_speechvq(load_fairseq_checkpoint(path), source=str(path))


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


def speechvq_to_fairseq(model: nn.Module) -> dict[str, Any]:
    """A fairseq checkpoint dict for a speechvq wav2vec 2.0 or vq-wav2vec pretraining model.

    The layout is what fairseq's trainer writes (``cfg`` as plain containers, ``args`` None), so
    ``fairseq.checkpoint_utils.load_model_ensemble_and_task`` loads it, even with
    ``torch.load(weights_only=True)``.

    Raises:
        UserInputError: for a model fairseq cannot represent (not wav2vec 2.0, a k-means
            quantizer, shared codebooks, or a non-identity projection where fairseq has none).
    """
    from speechvq.models.vq_wav2vec import VqWav2VecModel
    from speechvq.models.wav2vec2 import Wav2Vec2Model

    if isinstance(model, VqWav2VecModel):
        return _vq_wav2vec_to_fairseq(model)
    if not isinstance(model, Wav2Vec2Model):
        raise UserInputError(
            f"`model` must be a wav2vec 2.0 or vq-wav2vec pretraining model to export to fairseq, "
            f"but is {type(model).__name__} instead."
        )
    cfg = model.cfg
    if cfg.encoder.kind != "conv":
        raise UserInputError(
            f"`model.encoder.kind` must be 'conv' to export to fairseq, but is {cfg.encoder.kind!r} instead."
        )
    if cfg.quantizer_type != "gumbel" or cfg.quantizer.combine_groups:
        raise UserInputError(
            "`model` must use fairseq's Gumbel quantizer (no k-means, no shared codebooks) to export."
        )
    state = {
        k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith(_SPEECHVQ_ONLY)
    }
    if cfg.encoder.out_channels == cfg.context.dim:
        linear = model.feature_projection.linear
        identity = torch.equal(linear.weight, torch.eye(cfg.context.dim)) and not bool(linear.bias.any())
        if not identity:
            raise UserInputError(
                "`model` must have an identity feature projection when the encoder width equals the "
                "model dim (fairseq has no projection then), but it is not the identity."
            )
        state = {k: v for k, v in state.items() if not k.startswith("feature_projection.linear.")}
    # The extractor norm has two fairseq names; keep the rule of this model's norm mode.
    skip = ".2." if cfg.encoder.norm_mode == "layer_norm" else ".2.1."
    table = [(fs, sv) for fs, sv in WAV2VEC2_KEY_MAP if not fs.endswith("{i}" + skip)]
    names = rename_keys(list(state), table, reverse=True)
    fs_state = {names[k]: v for k, v in state.items()}
    criterion = {
        "_name": "wav2vec",
        "infonce": True,
        "loss_weights": [cfg.loss.diversity_weight, cfg.loss.feature_penalty_weight],
        "log_keys": ["prob_perplexity", "code_perplexity", "temp"],
    }
    normalize = cfg.encoder.norm_mode == "layer_norm"
    return _checkpoint(fairseq_wav2vec2_config(cfg), criterion, normalize, fs_state, model)


def _vq_wav2vec_to_fairseq(model: nn.Module) -> dict[str, Any]:
    """:func:`speechvq_to_fairseq` of a vq-wav2vec model (fairseq's ``wav2vec`` with ``vq_type``)."""
    from speechvq.interop.fairseq_vq_export import fairseq_vq_wav2vec_config, vq_wav2vec_state_to_fairseq

    cfg: VqWav2VecConfig = model.cfg  # type: ignore[assignment]
    section = fairseq_vq_wav2vec_config(cfg)
    state = {
        k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith(_SPEECHVQ_ONLY)
    }
    fs_state = vq_wav2vec_state_to_fairseq(state, cfg, VQ_WAV2VEC_KEY_MAP)
    criterion = {"_name": "wav2vec", "infonce": False, "loss_weights": section["loss_weights"],
                 "log_keys": ["prob_perplexity", "code_perplexity", "temp"]}  # fmt: skip
    return _checkpoint(section, criterion, False, fs_state, model)


def _updates_of(model: nn.Module) -> int:
    """The update count a model carries (the Gumbel quantizer's; 0 for the k-means one)."""
    updates = getattr(model.get_submodule("quantizer"), "num_updates", None)
    return int(updates) if isinstance(updates, Tensor) else 0


def _checkpoint(
    model_section: dict[str, Any],
    criterion: dict[str, Any],
    normalize: bool,
    state: dict[str, Tensor],
    model: nn.Module,
) -> dict[str, Any]:
    """A checkpoint in the layout fairseq's trainer writes (``state``: fairseq's weights of
    ``model``), with the speechvq config and the speechvq-only buffers (Gumbel update count,
    k-means EMA statistics) in ``extra_state``, for a lossless round trip."""
    own = model.state_dict()
    buffers = {k: v.detach().cpu().clone() for k, v in own.items() if k.endswith(_SPEECHVQ_ONLY)}
    return {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {},
            "model": model_section,
            "task": {"_name": "audio_pretraining", "data": "", "normalize": normalize},
            "criterion": criterion,
        },
        "model": state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "Wav2vecCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": _updates_of(model),
            }
        ],
        "task_state": {},
        "extra_state": {"speechvq_config": model.cfg.to_dict(), "speechvq_buffers": buffers},  # type: ignore[operator]
    }


def save_fairseq_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a fairseq checkpoint file (see :func:`speechvq_to_fairseq`)."""
    target = check_output_file(path, "the fairseq checkpoint")
    checkpoint = speechvq_to_fairseq(model)
    tmp = target.with_name(f".{target.name}.tmp")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
