"""A training run through the real loop whose validation scores are scripted, for fault injection.

The task is a tiny linear model; its validation score at update ``s`` is ``SCORES[s]``, so the best
checkpoint is known in advance and is *not* the last one (step 2 of 6). Run as a script, it trains
into ``EXP`` and, with a kill point, SIGKILLs itself there::

    python scripted_run.py EXP [after-rename|after-best-json|during-rotation|before-rename STEP]

Kill points (each at the save of update ``STEP``):

- ``before-rename``: the checkpoint's files are written, its directory not yet renamed;
- ``after-rename``: the checkpoint is in place, ``best.json`` not yet updated;
- ``after-best-json``: ``best.json`` is updated, old checkpoints not yet rotated away;
- ``during-rotation``: a rotated-away checkpoint is being deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechvq.data import BucketBatchSampler
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import config_from_dict
from speechvq.train.loop import RunSummary, train

SCORES = {1: 5.0, 2: 1.0, 3: 3.0, 4: 2.0, 5: 4.0, 6: 2.5}
"""Validation score (lower is better) after each update: the best is update 2."""
MAX_STEPS = len(SCORES)


@dataclass
class Batch:
    x: torch.Tensor

    def to(self, device: Any) -> Batch:
        return Batch(self.x.to(device))

    def __len__(self) -> int:
        return len(self.x)


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        self.sizes = [1] * len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


class ScriptedTask:
    """A Task (see :class:`speechvq.train.tasks.base.Task`) whose validation scores are :data:`SCORES`."""

    name = "scripted"
    stat_names = ("loss", "targets", "nonfinite")
    eval_stat_names = ("loss", "items")
    lower_is_better = True
    export_name = "best_model"
    find_unused_parameters = False

    def __init__(self) -> None:
        self.updates = 0

    def config_yaml(self) -> str:
        return "scripted: true\n"

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        pass

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> Any:
        ds = Rows()
        sampler = BucketBatchSampler(ds.sizes, 2, num_replicas=num_replicas, rank=rank, shuffle=train)
        return ds, sampler, lambda items: Batch(torch.stack(items))

    def on_update(self, model: nn.Module, step: int) -> None:
        self.updates = step + 1  # validation after this update scores SCORES[step + 1]

    def batch_loss(self, module: Any, model: nn.Module, batch: Batch, **_: Any) -> tuple[torch.Tensor, dict]:
        loss = module(batch.x).pow(2).sum()
        return loss, {"loss": float(loss.detach()), "targets": float(len(batch)), "nonfinite": 0.0}

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(sums["targets"], 1.0)}

    def on_log(self, step: int, rec: dict, sums: dict, seconds: float, main: bool) -> list:
        return []

    def eval_batch(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        return {"loss": float(model(batch.x).pow(2).sum()), "items": float(len(batch))}

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        return {"score": SCORES[self.updates]}, SCORES[self.updates]

    def export(self, model: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, directory / "weights.pt")


def run_config() -> Any:
    return config_from_dict(
        {
            "data": {"train": "rows", "valid": "rows"},
            "optim": {"lr": 0.1, "clip_grad_norm": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "train": {
                "max_steps": MAX_STEPS, "valid_interval": 1, "save_interval": 1, "log_interval": 1,
                "keep_last": 1, "progress_bar": False, "tensorboard": False, "cpu": True,
            },
        }
    )  # fmt: skip


def run(exp: Path) -> RunSummary:
    """Train (or resume) the scripted run in ``exp``."""
    return train(ScriptedTask(), run_config(), exp)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    """Make this process SIGKILL itself at ``point`` of the save of update ``step``."""
    name = f"step_{step:08d}"
    if point == "before-rename":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(dst).name == name and Path(src).name.startswith(".tmp_"):
                _die()
            real_replace(src, dst)

        ckpt.os.replace = replace  # type: ignore[attr-defined]
    elif point == "after-rename":
        real_write_best = ckpt.write_best

        def write_best(root: Any, s: Any, *args: Any) -> None:
            if s == step:
                _die()
            real_write_best(root, s, *args)

        ckpt.write_best = write_best
    elif point == "after-best-json":
        real_rotate = ckpt.rotate_checkpoints

        def rotate(root: Any, keep_last: int) -> list:
            if (Path(root) / name).is_dir():
                _die()
            return real_rotate(root, keep_last)

        ckpt.rotate_checkpoints = rotate
    elif point == "during-rotation":
        real_rmtree = shutil.rmtree

        def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            if Path(path).name.startswith(".del_") and (Path(path).parent / name).is_dir():
                _die()
            real_rmtree(path, *args, **kwargs)

        ckpt.shutil.rmtree = rmtree  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 4:
        arm(sys.argv[2], int(sys.argv[3]))
    run(Path(sys.argv[1]))
