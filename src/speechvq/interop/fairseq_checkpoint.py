"""Reading fairseq checkpoints without running code from them, and the sections of their config.

fairseq checkpoints are pickles. :func:`load_fairseq_checkpoint` reads them with
``torch.load(weights_only=True)`` plus an explicit allow-list of the few plain types they hold
(``argparse.Namespace`` for argparse-era checkpoints, OmegaConf containers for some hydra-era
ones, numpy scalars in training metadata); anything else, such as a pickle that would call
``os.system``, is refused before it can run. :func:`checkpoint_sections` finds the model, task and
criterion settings in hydra-era (``cfg``) and argparse-era (``args``) checkpoints alike.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from speechvq.errors import UserInputError
from speechvq.files import require_file

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
        state["cfg"] = plain_containers(state["cfg"])
    return state


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the globals a checkpoint references beyond torch's defaults (scanned, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a scan failure only costs the hint
        return []


def plain_containers(value: Any) -> Any:
    """OmegaConf containers and Namespaces -> plain dicts and lists, recursively."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    except ImportError:
        pass
    if isinstance(value, argparse.Namespace):
        return {k: plain_containers(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: plain_containers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_containers(v) for v in value)
    return value


def checkpoint_sections(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model, task, criterion) settings of a checkpoint, from ``cfg`` or legacy ``args``."""
    cfg = ckpt.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"], cfg.get("task") or {}, cfg.get("criterion") or {}
    args = ckpt.get("args")
    if args is not None:
        flat = plain_containers(args)
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
