"""Conversion between speechvq's wav2vec 2.0 and transformers' ``Wav2Vec2ForPreTraining``.

Weights are renamed by the template table :data:`HF_KEY_MAP` (``{i}`` stands for a layer index),
never by branches in model code. The speechvq config is embedded in the transformers config as
``speechvq_config`` (transformers keeps unknown config keys), so speechvq -> hf -> speechvq is
lossless; a config without it (any checkpoint made by transformers) is mapped field by field.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from speechvq.config import (
    ContextConfig,
    FeatureEncoderConfig,
    LossConfig,
    MaskConfig,
    QuantizerConfig,
    Wav2Vec2Config,
)
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir, read_json, require_file
from speechvq.interop.keymap import rename_keys
from speechvq.io import read_safetensors, state_dict_for_save, write_directory
from speechvq.models.wav2vec2 import Wav2Vec2Model, build_wav2vec2

HF_KEY_MAP: list[tuple[str, str]] = [
    # (speechvq, transformers Wav2Vec2ForPreTraining)
    ("mask_embedding", "wav2vec2.masked_spec_embed"),
    ("feature_encoder.layers.{i}.conv.", "wav2vec2.feature_extractor.conv_layers.{i}.conv."),
    ("feature_encoder.layers.{i}.norm.", "wav2vec2.feature_extractor.conv_layers.{i}.layer_norm."),
    ("feature_projection.layer_norm.", "wav2vec2.feature_projection.layer_norm."),
    ("feature_projection.linear.", "wav2vec2.feature_projection.projection."),
    ("context.pos_conv.conv.", "wav2vec2.encoder.pos_conv_embed.conv."),
    ("context.layer_norm.", "wav2vec2.encoder.layer_norm."),
    ("context.layers.{i}.attention.", "wav2vec2.encoder.layers.{i}.attention."),
    (
        "context.layers.{i}.feed_forward.linear1.",
        "wav2vec2.encoder.layers.{i}.feed_forward.intermediate_dense.",
    ),
    ("context.layers.{i}.feed_forward.linear2.", "wav2vec2.encoder.layers.{i}.feed_forward.output_dense."),
    ("context.layers.{i}.attention_norm.", "wav2vec2.encoder.layers.{i}.layer_norm."),
    ("context.layers.{i}.ffn_norm.", "wav2vec2.encoder.layers.{i}.final_layer_norm."),
    ("quantizer.weight_proj.", "quantizer.weight_proj."),
    ("quantizer.codevectors", "quantizer.codevectors"),
    ("project_q.", "project_q."),
    ("project_hid.", "project_hid."),
]

# Older checkpoints (fairseq, transformers 4.x) store the weight-norm pair under these names.
_LEGACY_WEIGHT_NORM = {
    ".conv.weight_g": ".conv.parametrizations.weight.original0",
    ".conv.weight_v": ".conv.parametrizations.weight.original1",
}

# Buffers speechvq keeps that transformers has no slot for (carried in the config instead).
_SPEECHVQ_ONLY = ("quantizer.num_updates",)


def speechvq_to_hf_state_dict(model: Wav2Vec2Model) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` under ``Wav2Vec2ForPreTraining`` names."""
    state = {k: v for k, v in state_dict_for_save(model).items() if k not in _SPEECHVQ_ONLY}
    names = rename_keys(list(state), HF_KEY_MAP)
    return {names[k]: v for k, v in state.items()}


def hf_to_speechvq_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``Wav2Vec2ForPreTraining`` (or bare ``Wav2Vec2Model``) state dict under speechvq names."""
    if not any(k.startswith("wav2vec2.") for k in state):
        state = {f"wav2vec2.{k}": v for k, v in state.items()}  # bare Wav2Vec2Model
    fixed = {}
    for key, value in state.items():
        for old, new in _LEGACY_WEIGHT_NORM.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        fixed[key] = value
    names = rename_keys(list(fixed), HF_KEY_MAP, reverse=True)
    return {names[k]: v for k, v in fixed.items()}


def hf_config_from_speechvq(cfg: Wav2Vec2Config, num_updates: int = 0) -> Any:
    """A ``transformers.Wav2Vec2Config`` describing the same architecture and objective."""
    from transformers import Wav2Vec2Config as HFConfig

    e, c, q, m, loss = cfg.encoder, cfg.context, cfg.quantizer, cfg.mask, cfg.loss
    if e.kind != "conv":
        raise UserInputError(
            f"`model.encoder.kind` must be 'conv' to convert to transformers (its wav2vec 2.0 has only the "
            f"raw-waveform CNN), but is {e.kind!r} instead; keep the speechvq format (save_pretrained)."
        )
    return HFConfig(
        conv_dim=[ch for ch, _, _ in e.conv_layers],
        conv_kernel=[k for _, k, _ in e.conv_layers],
        conv_stride=[s for _, _, s in e.conv_layers],
        conv_bias=e.conv_bias,
        feat_extract_norm="layer" if e.norm_mode == "layer_norm" else "group",
        feat_extract_activation="gelu",
        hidden_size=c.dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.ffn_dim,
        hidden_act="gelu",
        do_stable_layer_norm=c.layer_norm_first,
        num_conv_pos_embeddings=c.pos_conv_kernel,
        num_conv_pos_embedding_groups=c.pos_conv_groups,
        hidden_dropout=c.dropout_p,
        activation_dropout=c.activation_dropout_p,
        attention_dropout=c.attention_dropout_p,
        layerdrop=c.layer_drop_p,
        layer_norm_eps=c.layer_norm_eps,
        feat_proj_dropout=cfg.feature_dropout_p,
        feat_quantizer_dropout=q.dropout_p,
        num_codevector_groups=q.num_codebooks,
        num_codevectors_per_group=q.codebook_size,
        codevector_dim=q.codevector_dim,
        proj_codevector_dim=cfg.final_dim,
        mask_time_prob=m.mask_prob,
        mask_time_length=m.mask_length,
        mask_time_min_masks=m.min_masks,
        mask_feature_prob=m.channel_prob,
        mask_feature_length=m.channel_length,
        num_negatives=loss.num_negatives,
        contrastive_logits_temperature=loss.logit_temp,
        diversity_loss_weight=loss.diversity_weight,
        speechvq_config=cfg.to_dict(),
        speechvq_num_updates=int(num_updates),
    )


def speechvq_config_from_hf(hf: Any) -> Wav2Vec2Config:
    """The speechvq config of a ``transformers.Wav2Vec2Config`` (embedded copy if present)."""
    embedded = getattr(hf, "speechvq_config", None)
    if isinstance(embedded, dict):
        return Wav2Vec2Config.from_dict(embedded)
    for name in ("feat_extract_activation", "hidden_act"):
        if getattr(hf, name) != "gelu":
            raise UserInputError(
                f"transformers config: `{name}` must be 'gelu', but is {getattr(hf, name)!r} instead."
            )
    if getattr(hf, "add_adapter", False):
        raise UserInputError("transformers config: adapters (`add_adapter=True`) are not supported.")
    return Wav2Vec2Config(
        encoder=FeatureEncoderConfig(
            conv_layers=tuple(zip(hf.conv_dim, hf.conv_kernel, hf.conv_stride)),
            norm_mode="layer_norm" if hf.feat_extract_norm == "layer" else "group_norm",
            conv_bias=hf.conv_bias,
        ),
        quantizer=QuantizerConfig(
            num_codebooks=hf.num_codevector_groups,
            codebook_size=hf.num_codevectors_per_group,
            codevector_dim=hf.codevector_dim,
            dropout_p=hf.feat_quantizer_dropout,
        ),
        mask=MaskConfig(
            mask_prob=hf.mask_time_prob,
            mask_length=hf.mask_time_length,
            min_masks=hf.mask_time_min_masks,
            channel_prob=hf.mask_feature_prob,
            channel_length=hf.mask_feature_length,
        ),
        context=ContextConfig(
            dim=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            ffn_dim=hf.intermediate_size,
            layer_norm_first=hf.do_stable_layer_norm,
            pos_conv_kernel=hf.num_conv_pos_embeddings,
            pos_conv_groups=hf.num_conv_pos_embedding_groups,
            dropout_p=hf.hidden_dropout,
            attention_dropout_p=hf.attention_dropout,
            activation_dropout_p=hf.activation_dropout,
            layer_drop_p=hf.layerdrop,
            layer_norm_eps=hf.layer_norm_eps,
        ),
        # transformers' pretraining loss has no feature penalty
        loss=LossConfig(
            num_negatives=hf.num_negatives,
            logit_temp=hf.contrastive_logits_temperature,
            diversity_weight=hf.diversity_loss_weight,
            feature_penalty_weight=0.0,
        ),
        final_dim=hf.proj_codevector_dim,
        feature_dropout_p=hf.feat_proj_dropout,
    )


def to_hf(model: Wav2Vec2Model) -> Any:
    """A ``Wav2Vec2ForPreTraining`` holding the same weights (strict load)."""
    from transformers import Wav2Vec2ForPreTraining

    hf = Wav2Vec2ForPreTraining(hf_config_from_speechvq(model.cfg, int(model.quantizer.num_updates)))
    hf.load_state_dict(speechvq_to_hf_state_dict(model), strict=True)
    return hf.eval()


def from_hf(hf_model: Any) -> Wav2Vec2Model:
    """A speechvq model holding the weights of a ``Wav2Vec2ForPreTraining`` (strict load)."""
    cfg = speechvq_config_from_hf(hf_model.config)
    model = build_wav2vec2(cfg)
    state = hf_to_speechvq_state_dict(hf_model.state_dict())
    state["quantizer.num_updates"] = torch.tensor(int(getattr(hf_model.config, "speechvq_num_updates", 0)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_hf(model: Wav2Vec2Model, directory: str | Path) -> Path:
    """Write a transformers ``save_pretrained`` directory (model + feature-extractor config)."""
    from transformers import Wav2Vec2FeatureExtractor

    directory = check_output_dir(directory, "the transformers model directory")
    with quiet_transformers():
        return write_directory(directory, lambda tmp: _save_hf(model, tmp, Wav2Vec2FeatureExtractor))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars while writing (stderr keeps to the one error line, if any)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _save_hf(model: Wav2Vec2Model, directory: Path, extractor: Any) -> None:
    to_hf(model).save_pretrained(directory)
    extractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        # transformers normalises with its own eps (1e-7), not the model's (model.waveform_norm.eps)
        do_normalize=model.waveform_norm.enabled,
        return_attention_mask=model.waveform_norm.enabled,
    ).save_pretrained(directory)


def load_hf(directory: str | Path) -> Wav2Vec2Model:
    """Read a transformers directory (safetensors, or a ``.bin`` through ``weights_only``) offline."""
    from transformers import Wav2Vec2Config as HFConfig

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise UserInputError(f"{directory}: not a transformers model directory (no config.json)")
    try:
        hf_cfg = HFConfig.from_dict(read_json(config_path, "transformers config"))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        if isinstance(err, UserInputError):
            raise
        raise UserInputError(f"{config_path}: invalid transformers config: {err}") from None
    if (directory / "model.safetensors").exists():
        state = read_safetensors(directory / "model.safetensors")
    elif (directory / "pytorch_model.bin").exists():
        bin_path = require_file(directory / "pytorch_model.bin", "weights file")
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses code; anything else is a damaged file
            reason = " ".join(str(err).split())[:200]
            raise UserInputError(f"{bin_path}: not a readable weights-only torch file ({reason})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserInputError(f"{bin_path}: must hold a dict of tensors")
    else:
        raise UserInputError(f"{directory}: no model.safetensors or pytorch_model.bin")
    try:
        cfg = speechvq_config_from_hf(hf_cfg)
    except (TypeError, ValueError) as err:
        if isinstance(err, UserInputError):
            raise
        raise UserInputError(f"{config_path}: unsupported transformers config: {err}") from None
    model = build_wav2vec2(cfg)
    try:
        converted = hf_to_speechvq_state_dict(state)
    except KeyError as err:
        raise UserInputError(
            f"{directory}: not a transformers wav2vec 2.0 checkpoint (unexpected parameter {err.args[0]!r})"
        ) from None
    converted["quantizer.num_updates"] = torch.tensor(int(getattr(hf_cfg, "speechvq_num_updates", 0)))
    own = model.state_dict()
    shapes = [k for k in converted if k in own and tuple(converted[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in converted]
    unexpected = [k for k in converted if k not in own]
    if shapes or unexpected or any(not k.startswith(("quantizer.", "project_")) for k in missing):
        raise UserInputError(
            f"{directory}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {shapes[:5]})"
        )
    model.load_state_dict(converted, strict=False)
    return model.eval()
