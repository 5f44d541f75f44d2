"""speechvq's own model format: ``model.safetensors`` + ``config.json`` in a directory.

Loading never unpickles. ``config.json`` holds ``{"format": "speechvq", "model_type": ...,
"config": {...}}``; the model type selects the config class and builder from :data:`MODEL_TYPES`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from speechvq.errors import UserInputError
from speechvq.files import check_output_dir, read_json, require_file, writing

FORMAT = "speechvq"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

MODEL_TYPES: dict[str, tuple[str, str]] = {
    # model_type: ("module:ConfigClass", "module:builder")
    "wav2vec2": ("speechvq.config:Wav2Vec2Config", "speechvq.models.wav2vec2:build_wav2vec2"),
    "wav2vec2_ctc": ("speechvq.models.ctc:CtcConfig", "speechvq.models.ctc:build_ctc_model"),
    "vq_wav2vec": ("speechvq.config:VqWav2VecConfig", "speechvq.models.vq_wav2vec:build_vq_wav2vec"),
}


def _resolve(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def model_type_of(model: nn.Module) -> str:
    """The registered model type of ``model`` (its builder's return class)."""
    name = getattr(model, "model_type", None)
    if isinstance(name, str):
        return name
    for key, (_, builder) in MODEL_TYPES.items():
        module, _ = builder.split(":")
        if type(model).__module__ == module:
            return key
    raise ValueError(f"`model` must be a registered speechvq model, but is {type(model).__name__} instead.")


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared copies of every tensor of the state dict (safetensors forbids sharing)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` to ``directory`` atomically (a temporary directory renamed into place)."""
    target = check_output_dir(directory, "the model directory")
    meta = {"format": FORMAT, "model_type": model_type_of(model), "config": model.cfg.to_dict()}  # type: ignore[operator]
    if extra:
        meta.update(extra)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            with writing(target / WEIGHTS_NAME):
                save_file(state_dict_for_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            with writing(target / CONFIG_NAME):
                (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return replace_directory(tmp, target)


def write_directory(target: Path, fill: Callable[[Path], None]) -> Path:
    """Write a directory atomically: ``fill(tmp)`` writes a temporary sibling, which then replaces
    ``target`` (:func:`replace_directory`); on failure the temporary is removed and ``target`` is
    untouched. A full disk is reported as ``no space left on device: <target>``."""
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            fill(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return replace_directory(tmp, target)


def replace_directory(tmp: Path, target: Path) -> Path:
    """Move the fully written directory ``tmp`` to ``target`` with renames only, so that a reader
    sees the old or the new directory, never a half-written one; returns ``target``."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a speechvq model directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise UserInputError(f"{directory}: not a speechvq model directory (no {CONFIG_NAME})")
    meta = read_json(path, "model config")
    if meta.get("format") != FORMAT:
        raise UserInputError(f'{path}: not a speechvq config (missing "format": "{FORMAT}")')
    if meta.get("model_type") not in MODEL_TYPES:
        raise UserInputError(
            f"{path}: unknown model_type {meta.get('model_type')!r}; known: {sorted(MODEL_TYPES)}"
        )
    if not isinstance(meta.get("config"), dict):
        raise UserInputError(
            f'{path}: "config" must be a JSON object, but is {type(meta.get("config")).__name__} instead.'
        )
    return meta


def build_from_config(model_type: str, config: dict[str, Any]) -> nn.Module:
    """Build an untrained model of ``model_type`` from its config dict."""
    config_spec, builder_spec = MODEL_TYPES[model_type]
    cfg = _resolve(config_spec).from_dict(config)
    return _resolve(builder_spec)(cfg)


def read_safetensors(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with one-line errors naming it (never a pickle).

    Raises:
        UserInputError: the file is missing, not a regular file, or not a readable safetensors file.
    """
    require_file(path, "weights file")
    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors raises its own error types for a malformed file
        reason = " ".join(str(err).split())[:200]
        raise UserInputError(f"{path}: not a readable safetensors file ({reason})") from None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(state)`` strictly, with names and shapes checked first: a mismatch is
    one line naming ``path`` (the weights file), not torch's multi-line RuntimeError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        raise UserInputError(
            f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {shapes[:3]})"
        )
    model.load_state_dict(state, strict=True)


def load_pretrained(directory: str | os.PathLike[str], map_location: str = "cpu") -> nn.Module:
    """Load a model written by :func:`save_pretrained` (strict: every key and shape must match)."""
    meta = read_config(directory)
    try:
        model = build_from_config(meta["model_type"], meta["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise UserInputError(f"{Path(directory) / CONFIG_NAME}: invalid config: {err}") from None
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.exists():
        raise UserInputError(f"{directory}: missing {WEIGHTS_NAME}")
    load_weights(model, read_safetensors(weights, map_location), weights)
    model.eval()
    return model
