"""Atomic checkpoints: safetensors weights plus the full training state, with rotation.

Layout of ``exp_dir/checkpoints/``::

    step_00001000/model.safetensors   weights (the unwrapped model's state dict)
    step_00001000/state.pt            optimizer, schedule, every RNG (per rank), sampler, counters
    step_00001000/config.yaml         the resolved run config
    step_00001000/meta.json           step and validation loss
    best.json                         the step and validation loss of the best checkpoint

A checkpoint is written into a temporary directory, every file is fsync'ed, and the directory is
then renamed to its final name, so a ``step_*`` directory is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) CUDA RNG states, as checkpoint-safe values."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state_(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    """numpy values -> torch/python values, so ``torch.load(weights_only=True)`` can read them."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    config_yaml: str,
    valid_loss: float | None = None,
) -> Path:
    """Write ``root/step_{step:08d}`` atomically and return its path.

    Args:
        root: the checkpoints directory (created if missing).
        step: updates done.
        weights: the model's state dict.
        state: optimizer, schedule, RNG, sampler and counters (tensors and plain values).
        config_yaml: the resolved config.
        valid_loss: validation loss at this step, if measured.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(_plain(state), tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "valid_loss": valid_loss}) + "\n")
    for name in ("model.safetensors", "state.pt", "config.yaml", "meta.json"):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. after a resume): replace it
        old = root / f".old_step_{step:08d}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of one checkpoint directory."""
    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return weights, state


def read_best(root: str | Path) -> dict[str, Any] | None:
    """``{"step", "valid_loss"}`` of the best checkpoint so far, or None."""
    path = Path(root) / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_best(root: str | Path, step: int, valid_loss: float) -> None:
    """Record ``step`` as the best checkpoint (atomically)."""
    root = Path(root)
    tmp = root / f".best.json.{os.getpid()}"
    tmp.write_text(json.dumps({"step": step, "valid_loss": valid_loss}) + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / "best.json")
    _fsync_dir(root)


def rotate_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the best one; returns the deleted."""
    found = list_checkpoints(root)
    best = read_best(root)
    best_name = f"step_{best['step']:08d}" if best else None
    removed = []
    for path in found[: max(len(found) - keep_last, 0)]:
        if path.name != best_name:
            shutil.rmtree(path)
            removed.append(path)
    return removed
