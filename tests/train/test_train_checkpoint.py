from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from speechvq.train import checkpoint as ckpt


def _save(root: Path, step: int, valid_loss: float | None = None) -> Path:
    return ckpt.save_checkpoint(
        root,
        step,
        weights={"w": torch.full((2, 3), float(step))},
        state={"step": step, "rng": [ckpt.rng_state()], "np": np.arange(3)},
        config_yaml="train: {}\n",
        valid_loss=valid_loss,
    )


def test_save_checkpoint_round_trips_weights_and_state(tmp_path: Path) -> None:
    path = _save(tmp_path, 7)
    weights, state = ckpt.load_checkpoint(path)
    assert torch.equal(weights["w"], torch.full((2, 3), 7.0))
    assert state["step"] == 7 and torch.equal(state["np"], torch.arange(3))
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "meta.json",
        "model.safetensors",
        "state.pt",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_latest_checkpoint_ignores_unfinished_temp_dirs(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / ".tmp_step_00000002_999").mkdir()  # a crash half-way through writing step 2
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_rng_state_restores_every_generator() -> None:
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    ckpt.set_rng_state_(state)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_rotate_checkpoints_keeps_last_n_and_the_best(tmp_path: Path) -> None:
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)]:
        _save(tmp_path, step, loss)
        best = ckpt.read_best(tmp_path)
        if best is None or loss < best["valid_loss"]:
            ckpt.write_best(tmp_path, step, loss)
        ckpt.rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step_00000002",
        "step_00000004",
        "step_00000005",
    ]
    assert ckpt.read_best(tmp_path) == {"step": 2, "valid_loss": 1.0}


def test_save_checkpoint_replaces_an_existing_step(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    ckpt.save_checkpoint(tmp_path, 3, weights={"w": torch.zeros(1)}, state={"step": 3}, config_yaml="")
    weights, _ = ckpt.load_checkpoint(tmp_path / "step_00000003")
    assert torch.equal(weights["w"], torch.zeros(1))
