"""A harness that runs ``speechvq pretrain`` as a subprocess and kills it (SIGKILL) again and again.

Used by ``test_fault_injection.py`` (a short version in the default suite, a long one marked slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

from speechvq.data import ManifestItem, write_manifest

RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")
SKIPPING = re.compile(r"skipping checkpoint (\S+):")
WRITE_DELAY_S = 0.12  # per file of a checkpoint: a write takes ~0.4 s, so a kill can land inside it


def make_corpus(root: Path, num_files: int = 8, seed: int = 0) -> Path:
    """``num_files`` short 16 kHz tone-and-noise wavs and their manifest."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_files):
        n = int(16000 * rng.uniform(0.6, 0.9))
        t = np.arange(n) / 16000
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(n)
        sf.write(root / f"utt{i:03d}.wav", wav.astype(np.float32), 16000)
        items.append(ManifestItem(relpath=f"utt{i:03d}.wav", num_samples=n, line=0))
    write_manifest(root / "train.tsv", root, items)
    return root / "train.tsv"


def write_config(path: Path, manifest: Path, max_steps: int) -> Path:
    """The tiny model (with dropout, so every RNG matters), fp32 on the CPU, a checkpoint every update."""
    path.write_text(
        f"""model:
  preset: tiny
  overrides: {{context.dropout_p: 0.1}}
data: {{train: {manifest}, max_sample_size: 12000, min_sample_size: 4000, max_tokens: 36000}}
optim: {{lr: 2.0e-3}}
schedule: {{name: polynomial, warmup_steps: 3}}
train:
  max_steps: {max_steps}
  log_interval: 1
  save_interval: 1
  keep_last: 2
  precision: fp32
  cpu: true
  progress_bar: false
  tensorboard: false
"""
    )
    return path


def intact(step_dir: Path) -> bool:
    """Independent of speechvq's own check: every file present and matching meta.json's sha256."""
    try:
        sums = json.loads((step_dir / "meta.json").read_text())["sha256"]
        return all(hashlib.sha256((step_dir / n).read_bytes()).hexdigest() == h for n, h in sums.items())
    except (OSError, ValueError, KeyError):
        return False


def step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []


def last_complete(ckpt_dir: Path) -> Path | None:
    done = [p for p in step_dirs(ckpt_dir) if intact(p)]
    return done[-1] if done else None


def _env() -> dict[str, str]:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SPEECHVQ_CKPT_WRITE_DELAY_S=str(WRITE_DELAY_S)
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def launch(config: Path, exp_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "speechvq", "pretrain", "--config", str(config), "--exp-dir", str(exp_dir)]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())


@dataclass
class Timing:
    """Of an uninterrupted run: seconds to the first checkpoint write, then seconds per update."""

    startup_s: float
    step_s: float


def run_uninterrupted(config: Path, exp_dir: Path, max_steps: int) -> Timing:
    """Run to the end without faults; returns its :class:`Timing` (to aim the random kills)."""
    log = exp_dir.parent / f"{exp_dir.name}.log"
    exp_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = launch(config, exp_dir, log)
    _wait_for_tmp(proc, exp_dir / "checkpoints", nth=1, timeout=600)
    startup = time.monotonic() - start
    if proc.wait(timeout=600) != 0:
        raise AssertionError(f"uninterrupted run failed:\n{log.read_text()}")
    return Timing(startup_s=startup, step_s=(time.monotonic() - start - startup) / max(max_steps, 1))


@dataclass
class Attempt:
    """One launch of the training process."""

    fault: str  # "kill-during-write", "kill-at-random-time", "none"
    expected_resume: str | None  # the last complete checkpoint before the launch
    corrupted: str | None = None  # the newest checkpoint, corrupted (one byte flipped) before the launch
    resumed_from: str | None = None  # what the process said it resumed from
    skipped: list[str] = field(default_factory=list)  # checkpoints it reported and skipped
    killed: bool = False
    killed_while_writing: str | None = None  # the .tmp_step_* directory present at the kill
    returncode: int | None = None


def _wait_for_tmp(proc: subprocess.Popen, ckpt_dir: Path, nth: int, timeout: float) -> str | None:
    """Poll until the ``nth`` distinct ``.tmp_step_*`` directory appears; its name, or None if the run ended."""
    seen: set[str] = set()
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ckpt_dir.is_dir():
            for p in ckpt_dir.glob(f".tmp_step_*_{proc.pid}"):  # this process's, not a killed one's
                if p.name not in seen:
                    seen.add(p.name)
                    if len(seen) >= nth:
                        return p.name
        time.sleep(0.005)
    return None


def _step(path: Path | None) -> int:
    return int(path.name.split("_")[1]) if path is not None else 0


def run_with_kills(
    config: Path,
    exp_dir: Path,
    *,
    max_steps: int,
    timing: Timing,
    kills: int,
    seed: int,
    corruptions: int = 0,
) -> list[Attempt]:
    """Train to the end, killing the process ``kills`` times and flipping a byte of the newest
    checkpoint before ``corruptions`` of the launches; returns one :class:`Attempt` per launch."""
    rng = random.Random(seed)
    ckpt_dir = exp_dir / "checkpoints"
    plan = ["kill-during-write", "kill-at-random-time"] * ((kills + 1) // 2)
    plan = plan[:kills]
    rng.shuffle(plan)
    corrupt_at = set(rng.sample(range(1, len(plan)), min(corruptions, len(plan) - 1)))
    pending = 0  # corruptions due, done as soon as there is a checkpoint to corrupt
    attempts: list[Attempt] = []
    for i in range(len(plan) + 50):
        fault = plan[i] if i < len(plan) else "none"
        corrupted = None
        pending += i in corrupt_at
        complete = [p for p in step_dirs(ckpt_dir) if intact(p)]
        if pending and len(complete) >= 2 and i < len(plan):  # leave an intact one to fall back to
            pending -= 1
            newest = complete[-1]
            # flip one byte of its weights: the checksum must catch it
            data = bytearray((newest / "model.safetensors").read_bytes())
            data[len(data) // 2] ^= 0x01
            (newest / "model.safetensors").write_bytes(bytes(data))
            corrupted = str(newest)
        expected = last_complete(ckpt_dir)
        attempt = Attempt(
            fault=fault, expected_resume=str(expected) if expected else None, corrupted=corrupted
        )
        log = exp_dir.parent / f"{exp_dir.name}.attempt{i:02d}.log"
        exp_dir.parent.mkdir(parents=True, exist_ok=True)
        proc = launch(config, exp_dir, log)
        if fault == "kill-during-write":
            # the 1st to 3rd checkpoint this process writes (never more than it has left to write)
            nth = rng.randint(1, max(1, min(3, max_steps - _step(expected) - 1)))
            name = _wait_for_tmp(proc, ckpt_dir, nth=nth, timeout=300)
            if name is not None:
                time.sleep(rng.uniform(0.0, 2.5 * WRITE_DELAY_S))  # somewhere inside the write
                present = [p.name for p in ckpt_dir.glob(f".tmp_step_*_{proc.pid}")]
                proc.send_signal(signal.SIGKILL)
                attempt.killed_while_writing = present[0] if present else None
        elif fault == "kill-at-random-time":
            # from the middle of start-up to half-way through the updates left, so the run cannot
            # finish before every planned kill has landed; the timer is aimed from the timed run,
            # so half-way is also watched for, in case this run goes faster (a less loaded machine)
            left = max_steps - _step(expected)
            halfway = _step(expected) + max(1, left // 2)
            deadline = time.monotonic() + rng.uniform(
                0.3 * timing.startup_s, timing.startup_s + 0.5 * left * timing.step_s
            )
            while proc.poll() is None:
                newest = step_dirs(ckpt_dir)
                if time.monotonic() >= deadline or (newest and _step(newest[-1]) >= halfway):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        attempt.returncode = proc.wait(timeout=600)
        attempt.killed = attempt.returncode == -signal.SIGKILL  # (not if it finished first)
        text = log.read_text(errors="replace")
        if m := RESUMING.search(text):
            attempt.resumed_from = m.group(1)
        attempt.skipped = SKIPPING.findall(text)
        attempts.append(attempt)
        if not attempt.killed:
            if attempt.returncode != 0:
                raise AssertionError(f"attempt {i} ({fault}) failed with {attempt.returncode}:\n{text}")
            return attempts  # the run reached max_steps
    raise AssertionError("the run never finished")


def final_weights(exp_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step_dirs(exp_dir / "checkpoints")[-1] / "model.safetensors"))
