"""Best-model bookkeeping survives a kill at any point of a checkpoint save.

``scripted_run.py`` trains through the real loop with scripted validation scores (best at update 2
of 6, then worse and better ones, so a lost record changes the outcome). A run is SIGKILLed at each
point of the save of a checkpoint and rerun; its ``best.json`` and exported ``best_model`` must
equal those of an uninterrupted run. Before the record moved into each checkpoint's ``meta.json``,
a kill after the checkpoint's rename and before ``best.json`` made the resumed run pick update 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripted_run import run

from speechvq.train import checkpoint as ckpt

SCRIPT = Path(__file__).with_name("scripted_run.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp = tmp_path_factory.mktemp("reference") / "exp"
    summary = run(exp)
    assert summary.best is not None and summary.best["step"] == 2
    return exp


def _killed_at(exp: Path, point: str, step: int) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(exp), point, str(step)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == -9, f"not killed at {point} (exit {done.returncode}):\n{done.stderr[-2000:]}"


@pytest.mark.parametrize(
    ("point", "step"),
    [
        ("after-rename", 2),
        ("after-best-json", 2),
        pytest.param("before-rename", 2, marks=pytest.mark.slow),
        pytest.param("during-rotation", 4, marks=pytest.mark.slow),
    ],
)
def test_a_kill_during_a_save_leaves_the_same_best_model_as_an_uninterrupted_run(
    reference: Path, tmp_path: Path, point: str, step: int
) -> None:
    exp = tmp_path / "exp"
    _killed_at(exp, point, step)
    summary = run(exp)  # the same command again: resumes and finishes
    assert summary.step == 6 and summary.best == {"step": 2, "valid_loss": 1.0}
    assert json.loads((exp / "checkpoints" / "best.json").read_text()) == json.loads(
        (reference / "checkpoints" / "best.json").read_text()
    )
    got = torch.load(exp / "best_model" / "weights.pt")
    want = torch.load(reference / "best_model" / "weights.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (exp / "checkpoints" / "step_00000002").is_dir()  # the best checkpoint was never rotated away


def test_a_checkpoint_records_the_best_as_of_its_step_and_a_damaged_best_json_is_rederived(
    reference: Path, tmp_path: Path
) -> None:
    meta = json.loads((reference / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["best"] == {"step": 2, "valid_loss": 1.0} and meta["valid_loss"] == 2.5
    (reference / "checkpoints" / "best.json").write_text("{oops")
    assert ckpt.read_best(reference / "checkpoints") is None  # ignored with a warning, never fatal
    assert ckpt.best_checkpoint(reference / "checkpoints") == reference / "checkpoints" / "step_00000002"
