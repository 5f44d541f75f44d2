"""Import of fairseq checkpoints (wav2vec 2.0, wav2vec 2.0 CTC, vq-wav2vec) and export of
wav2vec 2.0 and vq-wav2vec back to fairseq-loadable checkpoints.

Checkpoints are read safely by :mod:`speechvq.interop.fairseq_checkpoint` (no code from the
pickle runs) and configs mapped field by field by :mod:`speechvq.interop.fairseq_config`. Weights
are renamed by the template tables below (``{i}`` stands for a layer index), never by branches in
model code.

Entry points: :func:`import_fairseq` (path -> speechvq model), :func:`fairseq_to_speechvq`
(loaded checkpoint -> model), :func:`speechvq_to_fairseq` (wav2vec 2.0 or vq-wav2vec model ->
checkpoint dict) and :func:`save_fairseq_checkpoint` (model -> ``.pt`` file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechvq.config import (
    MaskConfig,
    VqWav2VecConfig,
    Wav2Vec2Config,
)
from speechvq.errors import UserInputError
from speechvq.files import check_output_file, writing
from speechvq.interop.fairseq_checkpoint import (
    checkpoint_sections,
    fairseq_model_kind,
    load_fairseq_checkpoint,
    plain_containers,
)
from speechvq.interop.fairseq_config import (
    fairseq_wav2vec2_config,
    vq_wav2vec_config_from_fairseq,
    wav2vec2_config_from_fairseq,
)
from speechvq.interop.keymap import KeyTable, rename_keys
from speechvq.models.kmeans_quantizer import KMeansVectorQuantizer

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
    w2v_args = plain_containers(w2v_args)
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
    return _checkpoint(fairseq_wav2vec2_config(cfg), criterion, cfg.waveform_norm.enabled, fs_state, model)


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
