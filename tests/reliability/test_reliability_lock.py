"""One run per experiment directory: a second run is refused naming the holder's pid; the lock of
a dead run is taken over; the other ranks of one multi-process run do not lock."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import make_workspace

from speechvq.cli import main
from speechvq.train.lock import LOCK_NAME, ExperimentLockedError, acquire, experiment_lock, release

HOLD = "import sys, time; from speechvq.train.lock import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def _holder(exp: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("lock") / "w")


@pytest.mark.parametrize("command", ["pretrain", "finetune-ctc"])
def test_a_second_run_on_a_locked_experiment_is_refused_naming_the_holder(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    exp = tmp_path / "exp"
    holder = _holder(exp)
    try:
        argv = [
            "--log-level",
            "ERROR",
            command,
            "--config",
            str(workspace / "config.yaml"),
            "--exp-dir",
            str(exp),
        ]
        if command == "finetune-ctc":  # its task writes vocab.json before the loop: locked before that
            argv = ["--log-level", "ERROR", command, "--config", str(tmp_path / "ft.yaml"), "--init", "none",
                    "--train", str(workspace / "good.tsv"), "--exp-dir", str(exp)]  # fmt: skip
            (tmp_path / "ft.yaml").write_text("model: {preset: tiny}\n")
            (workspace / "good.ltr").write_text("H I |\nH O |\n")
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and f"another run (pid {holder.pid}) is using this experiment directory" in err[0]
        ), err
        assert sorted(p.name for p in exp.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exp = tmp_path / "exp"
    holder = _holder(exp)
    os.kill(holder.pid, signal.SIGKILL)  # the lock file stays, naming a dead pid
    holder.wait()
    assert (exp / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    with caplog.at_level(logging.INFO), experiment_lock(exp) as path:
        assert path == exp.resolve() / LOCK_NAME
        assert (exp / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert any(
        f"taking over the lock left by pid {holder.pid} (no longer running)" in r.getMessage()
        for r in caplog.records
    )


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_end(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    with experiment_lock(exp), experiment_lock(exp):  # the command, then the loop
        pass
    holder = _holder(exp)  # another process can take it now
    try:
        with pytest.raises(ExperimentLockedError, match=f"pid {holder.pid}"):
            acquire(exp)
    finally:
        holder.kill()
        holder.wait()
    release(exp)  # releasing a lock this process does not hold is a no-op


def test_other_ranks_of_a_run_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = _holder(tmp_path / "exp")
    try:
        monkeypatch.setenv("RANK", "1")
        assert acquire(tmp_path / "exp") is None
    finally:
        holder.kill()
        holder.wait()
