"""Atomic checkpoints: safetensors weights plus the full training state, with rotation.

Layout of ``exp_dir/checkpoints/``::

    step_00001000/model.safetensors   weights (the unwrapped model's state dict)
    step_00001000/state.pt            optimizer, schedule, every RNG (per rank), sampler, counters
    step_00001000/config.yaml         the resolved run config
    step_00001000/meta.json           step, validation loss, the best checkpoint so far, and the
                                      sha256 of every other file
    best.json                         the step and validation loss of the best checkpoint (a copy
                                      of the newest checkpoint's ``best``)

A checkpoint is written into a temporary directory, every file is fsync'ed, and the directory is
then renamed to its final name, so a ``step_*`` directory is always complete. ``meta.json`` is
written last and holds the sha256 of every other file; :func:`latest_checkpoint` verifies them and
skips (with a warning) a checkpoint that is incomplete or corrupt, falling back to the previous one.
Leftovers of a killed writer (``.tmp_*``, ``.old_*``, ``.del_*``) are cleaned up by the next save.

A write that fails (a full disk) removes its temporary directory and raises
:class:`CheckpointWriteError`; earlier checkpoints are untouched.

Best-model bookkeeping survives a kill at any point: every checkpoint's ``meta.json`` records the
best checkpoint *as of that step* (its own score included), written atomically with it, so the
checkpoint a run resumes from says which checkpoint is best; ``best.json`` is only a copy, rewritten
from it on resume (:func:`best_of`) and after every save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from speechvq.errors import UserInputError
from speechvq.files import NO_SPACE, is_disk_full, read_json, write_atomic

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)_step_(\d+)_(\d+)$")
_FILES = ("model.safetensors", "state.pt", "config.yaml")
WRITE_DELAY_ENV = "SPEECHVQ_CKPT_WRITE_DELAY_S"
"""Test hook for fault injection: seconds to sleep after each file of a checkpoint is written, so
that a kill can be made to land in the middle of a write. Unset (or 0) in normal use."""


_NOT_RECORDED: Any = object()
"""``save_checkpoint(best=...)`` left out: the checkpoint records no best (readers use ``best.json``)."""


class CheckpointWriteError(UserInputError):
    """A checkpoint could not be written (e.g. no space left); the previous ones are intact."""


class CorruptCheckpointError(UserInputError):
    """A checkpoint is incomplete, fails its checksums, or holds something that is not plain data."""


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
    best: Any = _NOT_RECORDED,
) -> Path:
    """Write ``root/step_{step:08d}`` atomically and return its path.

    Args:
        root: the checkpoints directory (created if missing).
        step: updates done.
        weights: the model's state dict.
        state: optimizer, schedule, RNG, sampler and counters (tensors and plain values).
        config_yaml: the resolved config.
        valid_loss: validation loss at this step, if measured.
        best: ``{"step", "valid_loss"}`` of the best checkpoint as of this step (this one, if its
            score is the best so far), or None before any validation; stored in ``meta.json``.
            Left out, nothing is recorded and readers fall back to ``best.json``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
    current = tmp
    try:
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        current = tmp / "model.safetensors"
        save_file(tensors, str(current), metadata={"step": str(step)})
        _pause(delay)
        current = tmp / "state.pt"
        torch.save(_plain(state), current)
        _pause(delay)
        current = tmp / "config.yaml"
        current.write_text(config_yaml)
        _pause(delay)
        sums = {name: sha256_file(tmp / name) for name in _FILES}
        current = tmp / "meta.json"
        meta: dict[str, Any] = {"step": step, "valid_loss": valid_loss, "sha256": sums}
        if best is not _NOT_RECORDED:
            meta["best"] = best
        current.write_text(json.dumps(meta) + "\n")
        for name in (*_FILES, "meta.json"):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        what = _write_failure(err)
        previous = latest_checkpoint(root, verify=False)
        kept = (
            f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        )
        if what == NO_SPACE:
            message = f"{NO_SPACE}: {final / current.name} (checkpoint not written; {kept})"
        else:
            message = f"{final}: checkpoint not written: {what} while writing {current.name}; {kept}"
        raise CheckpointWriteError(message) from err
    if final.exists():  # the same step written again (e.g. after a resume): replace it
        old = root / f".old_step_{step:08d}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _write_failure(err: BaseException) -> str:
    """What went wrong in a failed write, in a few words (:data:`NO_SPACE` for a full disk)."""
    if is_disk_full(err):
        return NO_SPACE
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _pause(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clean_leftovers(root: str | Path) -> list[Path]:
    """Remove what a killed writer left in ``root``; returns the removed paths.

    ``.tmp_step_*`` (a write that never finished) and ``.del_step_*`` (a rotation that never
    finished) are deleted. An ``.old_step_N_*`` (a replaced checkpoint whose replacement never
    arrived) is renamed back to ``step_N`` when that is missing and it verifies, else deleted.
    """
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        m = _LEFTOVER.match(path.name)
        if not m or not path.is_dir():
            continue
        final = root / f"step_{int(m.group(2)):08d}"
        if m.group(1) == "old" and not final.exists() and verify_checkpoint(path) is None:
            os.replace(path, final)
            logger.warning("restored %s from %s left by an interrupted write", final.name, path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info(
            "removed leftovers of an interrupted checkpoint write: %s", ", ".join(p.name for p in removed)
        )
    return removed


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint directory is complete and every file matches its sha256, else the problem.

    Checkpoints written before checksums existed (no ``sha256`` in ``meta.json``) are only
    checked for completeness.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "incomplete: meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"meta.json is not valid JSON ({err})"
    if not isinstance(meta, dict):
        return "meta.json must hold a JSON object"
    sums = meta.get("sha256")
    for name in _FILES:
        if not (path / name).is_file():
            return f"incomplete: {name} is missing"
        if isinstance(sums, dict):
            expected = sums.get(name)
            if expected is None:
                return f"meta.json has no sha256 for {name}"
            if sha256_file(path / name) != expected:
                return f"{name} does not match its sha256 in meta.json (corrupt or modified)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path, *, verify: bool = True) -> Path | None:
    """The newest checkpoint that verifies (see :func:`verify_checkpoint`), or None if there is none.

    Newer checkpoints that fail verification are skipped with a warning naming them.

    Raises:
        CorruptCheckpointError: there are checkpoints, but none of them verifies.
    """
    found = list_checkpoints(root)
    if not verify:
        return found[-1] if found else None
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
    if found:
        raise CorruptCheckpointError(
            f"{Path(root)}: none of the {len(found)} checkpoints is intact (see the warnings); move them "
            "away to start from scratch"
        )
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of one checkpoint directory, after verifying its checksums.

    ``state.pt`` is read with ``torch.load(weights_only=True)``: it can hold tensors and plain
    Python values only, never objects whose unpickling would run code.

    Raises:
        CorruptCheckpointError: the checkpoint fails verification, or ``state.pt`` is refused.
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CorruptCheckpointError(f"{path}: {problem}")
    try:
        weights = load_file(str(path / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error types for a malformed file
        raise CorruptCheckpointError(
            f"{path / 'model.safetensors'}: not a readable safetensors file ({err})"
        ) from err
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        why = lines[0].rstrip(".") if lines else type(err).__name__
        raise CorruptCheckpointError(
            f"{path / 'state.pt'}: refused to load: it holds objects other than tensors and plain values, "
            f"whose unpickling could run code ({why})"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CorruptCheckpointError(f"{path / 'state.pt'}: not a readable torch file ({err})") from err
    return weights, state


def read_best(root: str | Path) -> dict[str, Any] | None:
    """``{"step", "valid_loss"}`` of ``best.json``, or None (missing, or damaged: a warning says so).

    ``best.json`` is a copy of the newest checkpoint's record (see :func:`best_of`); a damaged one
    is never fatal.
    """
    path = Path(root) / "best.json"
    if not path.exists():
        return None
    try:
        record = read_json(path, "best-checkpoint record")
    except UserInputError as err:
        logger.warning("ignoring %s", err)
        return None
    if not _valid_best(record):
        logger.warning("ignoring %s: must hold {step, valid_loss}, but holds %r", path, record)
        return None
    return record


def _valid_best(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("step"), int)
        and not isinstance(record.get("step"), bool)
        and isinstance(record.get("valid_loss"), (int, float))
    )


_LEGACY = object()


def _recorded_best(path: Path) -> Any:
    """The ``best`` record of one checkpoint's ``meta.json``; ``_LEGACY`` if it has none."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return _LEGACY
    if not isinstance(meta, dict) or "best" not in meta:
        return _LEGACY
    best = meta["best"]
    return best if _valid_best(best) else None


def best_of(checkpoint: str | Path | None, root: str | Path) -> dict[str, Any] | None:
    """The best checkpoint as of ``checkpoint`` (the one a run resumes from), or None.

    It is the record in the checkpoint's own ``meta.json``, which is written atomically with it, so
    a kill between a checkpoint's rename and the ``best.json`` update loses nothing. Checkpoints
    written before that record existed fall back to ``best.json`` (and the checkpoint's own score).
    """
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    best = _recorded_best(path)
    if best is not _LEGACY:
        return best
    best = read_best(root)
    try:
        own = json.loads((path / "meta.json").read_text()).get("valid_loss")
    except (OSError, ValueError, AttributeError):
        own = None
    step = int(_STEP_DIR.match(path.name).group(1)) if _STEP_DIR.match(path.name) else None
    newer = best is None or (step is not None and best["step"] < step)
    if (
        isinstance(own, (int, float))
        and step is not None
        and newer
        and (best is None or own < best["valid_loss"])
    ):
        return {"step": step, "valid_loss": own}
    return best


def best_checkpoint(root: str | Path) -> Path | None:
    """The directory of the best checkpoint under ``root`` (by the newest intact checkpoint's record),
    else the newest intact checkpoint, else None."""
    root = Path(root)
    latest = latest_checkpoint(root)
    best = best_of(latest, root)
    if best is not None:
        path = root / f"step_{best['step']:08d}"
        if path.is_dir() and verify_checkpoint(path) is None:
            return path
        logger.warning("the best checkpoint %s is missing or damaged; using %s", path.name, latest)
    return latest


def write_best(root: str | Path, step: int | None, valid_loss: float | None = None) -> None:
    """Record ``step`` as the best checkpoint (atomically); ``step=None`` removes the record."""
    root = Path(root)
    if step is None:
        (root / "best.json").unlink(missing_ok=True)
        return
    try:
        write_atomic(root / "best.json", json.dumps({"step": step, "valid_loss": valid_loss}) + "\n")
    except UserInputError as err:  # best.json is a copy: the checkpoint's meta.json has the record
        logger.error("%s (best.json is only a copy of the checkpoint's record)", err)


def rotate_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the best one; returns the deleted."""
    found = list_checkpoints(root)
    best = read_best(root)
    best_name = f"step_{best['step']:08d}" if best else None
    removed = []
    for path in found[: max(len(found) - keep_last, 0)]:
        if path.name != best_name:
            # rename first, so that a kill during the deletion never leaves a partial step_* directory
            doomed = path.with_name(f".del_{path.name}_{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            removed.append(path)
    return removed
