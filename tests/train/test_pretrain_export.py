"""A finished pretraining run leaves a speechvq model directory for units, convert and --init."""

from __future__ import annotations

from pathlib import Path

import torch

from speechvq.io import load_pretrained
from speechvq.train import checkpoint as ckpt
from speechvq.train.tasks.pretrain import pretrain


def test_finished_run_exports_its_last_checkpoint_as_best_model(
    corpus: Path, tiny_cfg, tmp_path: Path
) -> None:
    summary = pretrain(tiny_cfg(corpus), tmp_path / "exp")
    assert summary.step == 6
    model = load_pretrained(tmp_path / "exp" / "best_model")
    weights, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "exp" / "checkpoints"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_run_stopped_by_its_time_budget_exports_too_but_an_interruption_does_not(
    corpus: Path, tiny_cfg, tmp_path: Path
) -> None:
    interrupted = pretrain(tiny_cfg(corpus), tmp_path / "a", stop_at_step=2)
    assert interrupted.stopped_early and not (tmp_path / "a" / "best_model").exists()
    timed = pretrain(tiny_cfg(corpus, train={"max_steps": 1000, "max_wall_s": 0.0}), tmp_path / "b")
    assert timed.stopped_early and timed.step < 1000
    assert (tmp_path / "b" / "best_model" / "model.safetensors").is_file()
