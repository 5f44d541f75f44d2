"""How a training run reports its launch: the start-up summary, a warning when ``accelerate
launch`` asked for more processes than run, periodic metric lines, and a re-run of a finished run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechvq.cli import main
from speechvq.train.launch import process_count_warning, requested_processes

LAUNCH = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]


@pytest.mark.parametrize(
    ("argv", "asked"),
    [
        ([*LAUNCH, "--num_processes", "2", "-m", "speechvq", "pretrain"], (2, "--num_processes 2")),
        ([*LAUNCH, "--cpu", "--num-processes=4", "train.py"], (4, "--num_processes 4")),
        (
            ["python", "-m", "accelerate.commands.launch", "--num_processes", "3", "-m", "x"],
            (3, "--num_processes 3"),
        ),
        # the launched program's own option is not the launcher's
        ([*LAUNCH, "-m", "speechvq", "pretrain", "--num_processes", "8"], None),
        (["/usr/bin/python", "-m", "speechvq", "pretrain"], None),  # not under accelerate
        (["bash", "run.sh"], None),
    ],
)
def test_requested_processes_reads_the_launcher_command_line(argv, asked, monkeypatch):
    monkeypatch.setattr("speechvq.train.launch._default_accelerate_config", lambda: None)
    got = requested_processes(argv)
    assert (
        got if got is None else (got[0], got[1].replace("=", " ").replace("-processes", "_processes"))
    ) == asked


def test_requested_processes_reads_the_launcher_config_file(tmp_path):
    config = tmp_path / "acc.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 2\n")
    assert requested_processes([*LAUNCH, "--config_file", str(config), "train.py"]) == (
        2,
        f"num_processes in {config}",
    )


def test_the_warning_names_the_request_and_the_way_out(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [*LAUNCH, "--num_processes", "2", "-m", "speechvq"]
    message = process_count_warning(1, argv)
    assert message is not None and "asked for 2 processes (--num_processes 2)" in message
    assert "this run is 1 process" in message and "--multi_gpu" in message and "\n" not in message
    assert process_count_warning(2, argv) is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # a process group of one was asked for and formed
    assert process_count_warning(1, argv) is None


def test_accelerate_launch_without_multi_gpu_warns_that_one_process_runs(tmp_path, corpus):
    # the real launcher: --num_processes 2 --cpu starts one process (accelerate says nothing)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "speechvq", "pretrain", "--config", "pretrain_tiny", "--exp-dir", str(tmp_path / "exp"),
        "--set", f"data.train={corpus}", "train.max_steps=1", "train.progress_bar=false", "train.tensorboard=false",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "accelerate launch asked for 2 processes (--num_processes 2), but this run is 1 process"
        in result.stderr
    )
    assert "pretrain: 1 process on cpu" in result.stderr


def test_startup_summary_metric_lines_and_a_finished_rerun(tmp_path: Path, corpus: Path, caplog):
    argv = [
        "pretrain", "--config", "pretrain_tiny", "--exp-dir", str(tmp_path / "exp"), "--set",
        f"data.train={corpus}", "train.max_steps=2", "train.log_interval=1", "train.progress_bar=false",
        "train.tensorboard=false", "train.precision=bf16",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "speechvq.train.loop"]
    (start,) = [m for m in lines if m.startswith("pretrain: 1 process on cpu")]
    for part in ["precision bf16", "batch 64,000 samples (4.0 s) per process x 1 accumulated",
                 "41,328 parameters (all trainable)", "train 16 utterances, 20.", "2 updates from scratch"]:  # fmt: skip
        assert part in start, (part, start)
    assert [m.split(":")[0] for m in lines if m.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert "loss " in lines[-1] and "accuracy " in lines[-1] and "lr " in lines[-1]
    first_done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done at step 2")]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0  # the same command again
    messages = [r.getMessage() for r in caplog.records]
    (finished,) = [m for m in messages if "already finished" in m]
    assert "2 of 2 updates" in finished and "nothing to train" in finished and "loss " in finished
    assert not any(m.startswith("step ") for m in messages)  # no update ran
    assert [m for m in messages if m.startswith("done at step 2")] == first_done  # the same summary
