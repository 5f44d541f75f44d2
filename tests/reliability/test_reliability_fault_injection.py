"""SIGKILL a pretraining process again and again, mid-checkpoint-write included, and resume each time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faults import (
    Attempt,
    final_weights,
    intact,
    make_corpus,
    run_uninterrupted,
    run_with_kills,
    step_dirs,
    write_config,
)


def _check(attempts: list[Attempt], exp_dir: Path, reference: Path, kills: int) -> None:
    killed = [a for a in attempts if a.killed]
    assert len(killed) >= kills, [a.fault for a in attempts]
    assert any(a.killed_while_writing for a in killed), "no kill landed inside a checkpoint write"
    for i, a in enumerate(attempts):
        if a.resumed_from is not None or not a.killed:  # a kill may land before the resume is logged
            # every resume starts from the last complete checkpoint (checked independently before the
            # launch), never from a partial or corrupt one; with none, the run starts from scratch
            assert a.resumed_from == a.expected_resume, (i, a)
        if a.corrupted and a.resumed_from is not None:
            assert a.skipped == [a.corrupted], (i, a)  # the corrupt checkpoint was reported and skipped
            assert a.resumed_from != a.corrupted
    final = step_dirs(exp_dir / "checkpoints")
    assert final and all(intact(p) for p in final)
    assert not [p for p in (exp_dir / "checkpoints").iterdir() if p.name.startswith((".tmp", ".old", ".del"))]
    a, b = final_weights(reference), final_weights(exp_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the uninterrupted run"


def _run(tmp_path: Path, *, max_steps: int, kills: int, corruptions: int, seed: int) -> list[Attempt]:
    manifest = make_corpus(tmp_path)
    config = write_config(tmp_path / "config.yaml", manifest, max_steps)
    timing = run_uninterrupted(config, tmp_path / "runs" / "straight", max_steps)
    attempts = run_with_kills(
        config, tmp_path / "runs" / "killed", max_steps=max_steps, timing=timing, kills=kills, seed=seed,
        corruptions=corruptions,
    )  # fmt: skip
    _check(attempts, tmp_path / "runs" / "killed", tmp_path / "runs" / "straight", kills)
    return attempts


def test_training_killed_repeatedly_resumes_from_the_last_complete_checkpoint_and_ends_bit_identical(
    tmp_path: Path,
) -> None:
    _run(tmp_path, max_steps=12, kills=4, corruptions=1, seed=0)


@pytest.mark.slow
def test_training_killed_many_times_over_a_long_run_ends_bit_identical(tmp_path: Path) -> None:
    attempts = _run(tmp_path, max_steps=40, kills=14, corruptions=2, seed=1)
    for i, a in enumerate(attempts):  # the table in docs/reliability.md comes from this
        print(i, a.fault, a.returncode, a.corrupted and Path(a.corrupted).name, a.killed, a.killed_while_writing, a.expected_resume and Path(a.expected_resume).name,
              a.resumed_from and Path(a.resumed_from).name, a.skipped and [Path(s).name for s in a.skipped])  # fmt: skip
