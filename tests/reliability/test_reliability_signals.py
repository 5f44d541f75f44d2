"""SIGTERM / SIGINT during training: the update in progress finishes, a checkpoint is written, the
command says how to resume, and the rerun ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from faults import final_weights, make_corpus, step_dirs

from speechvq.signals import stop_on_signals

MAX_STEPS = 8
STEP_LINE = re.compile(rb"step (\d+)/%d:" % MAX_STEPS)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _config(path: Path, manifest: Path) -> Path:
    """The tiny model with dropout (every RNG matters), checkpoints only at the end (save_interval
    beyond max_steps), so a mid-run checkpoint can only be the signal's."""
    path.write_text(
        textwrap.dedent(f"""\
        model: {{preset: tiny, overrides: {{context.dropout_p: 0.1}}}}
        data: {{train: {manifest}, max_sample_size: 12000, min_sample_size: 4000, max_tokens: 36000}}
        optim: {{lr: 2.0e-3}}
        schedule: {{name: polynomial, warmup_steps: 3}}
        train: {{max_steps: {MAX_STEPS}, log_interval: 1, save_interval: 1000, precision: fp32, cpu: true,
                progress_bar: false, tensorboard: false}}
        """)
    )
    return path


def _command(config: Path, exp_dir: Path) -> list[str]:
    return [sys.executable, "-m", "speechvq", "pretrain", "--config", str(config), "--exp-dir", str(exp_dir)]


def _run(config: Path, exp_dir: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(_command(config, exp_dir), capture_output=True, env=_env(), timeout=600)


def _signal_mid_run(config: Path, exp_dir: Path, signum: int, after_step: int) -> tuple[int, bytes]:
    """Start a run, send ``signum`` once it has logged update ``after_step``; (exit code, output)."""
    log = exp_dir.parent / f"{exp_dir.name}.log"
    exp_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(config, exp_dir), stdout=out, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        steps = [int(m) for m in STEP_LINE.findall(log.read_bytes())]
        if steps and max(steps) >= after_step:
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    return proc.wait(timeout=300), log.read_bytes()


def test_sigterm_mid_run_checkpoints_says_how_to_resume_and_the_rerun_ends_bit_identical(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path / "config.yaml", make_corpus(tmp_path))
    straight = _run(config, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr.decode()

    exp = tmp_path / "signalled"
    code, output = _signal_mid_run(config, exp, signal.SIGTERM, after_step=3)
    text = output.decode()
    assert code == 128 + signal.SIGTERM, text
    stopped = re.search(
        r"stopped by SIGTERM after update (\d+), with a checkpoint; resume with: speechvq (.*)", text
    )
    assert stopped, text
    step = int(stopped.group(1))
    assert 3 <= step < MAX_STEPS  # the update in progress was finished, no further one started
    assert stopped.group(2).split() == ["pretrain", "--config", str(config), "--exp-dir", str(exp)]
    assert [p.name for p in step_dirs(exp / "checkpoints")] == [f"step_{step:08d}"]
    assert not (exp / "best_model").exists()  # not finished: nothing exported

    resumed = _run(config, exp)  # the command it printed
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert (
        f"resuming from {exp / 'checkpoints' / f'step_{step:08d}'} (step {step})" in resumed.stderr.decode()
    )
    a, b = final_weights(tmp_path / "straight"), final_weights(exp)
    assert step_dirs(exp / "checkpoints")[-1].name == f"step_{MAX_STEPS:08d}" and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the uninterrupted run"

    # Ctrl-C (SIGINT) stops the same way, with the shell's exit code for it
    code, output = _signal_mid_run(config, tmp_path / "interrupted", signal.SIGINT, after_step=2)
    assert code == 130 and b"stopped by SIGINT after update" in output, output.decode()
    assert len(step_dirs(tmp_path / "interrupted/checkpoints")) == 1


def test_a_second_sigint_stops_at_once() -> None:
    # Python's own handler first: a test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, which is not the case under test.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_on_signals() as request:
            os.kill(os.getpid(), signal.SIGINT)
            assert request.requested and request.name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_second_sigterm_ends_the_process_at_once(tmp_path: Path) -> None:
    script = textwrap.dedent("""\
        import os, signal, time
        from speechvq.signals import stop_on_signals
        with stop_on_signals() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            print("first:", request.name, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("still running", flush=True)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=_env(), timeout=60)
    assert done.returncode == -signal.SIGTERM
    assert done.stdout.decode().splitlines() == ["first: SIGTERM"]
