"""A really full disk: commands run on a small tmpfs (mounted in a user and mount namespace with
``unshare``) and must say ``no space left on device: <path>`` in one line, exit code 2, and leave the
previous checkpoint intact. Where namespaces or tmpfs are not available the tests are skipped; the
same paths are covered with a simulated ENOSPC (and torch's zip-writer error) in
``test_reliability_checkpoint.py``."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bad_inputs import make_workspace

from speechvq.train import checkpoint as ckpt


def _tmpfs_works(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(where))}"],
            capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _on_tmpfs(mount: Path, size: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m speechvq ARGV`` with a tmpfs of ``size`` mounted at ``mount`` (for it alone)."""
    command = " ".join(
        shlex.quote(a) for a in [sys.executable, "-m", "speechvq", "--log-level", "ERROR", *argv]
    )
    script = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))} && {command}; rc=$?; "
    script += f"cp -a {shlex.quote(str(mount))}/. {shlex.quote(str(mount))}.after/ 2>/dev/null; exit $rc"
    (mount.parent / f"{mount.name}.after").mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full")
    if not _tmpfs_works(root / "probe"):
        pytest.skip(
            "cannot mount a tmpfs in a user namespace here (unshare -Urm); simulated ENOSPC covers it"
        )
    return make_workspace(root / "w")


def test_pretrain_on_a_full_disk_says_so_in_one_line_and_keeps_the_previous_checkpoint(
    workspace: Path,
) -> None:
    w = workspace
    config = w / "full.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": {"train": str(w / "good.tsv"), "min_sample_size": 1000, "max_tokens": 100000},
                "schedule": {"warmup_steps": 0},
                "train": {"max_steps": 3, "save_interval": 1, "keep_last": 2, "log_interval": 1,
                          "progress_bar": False, "tensorboard": False},
            }
        )
    )  # fmt: skip
    mount = w / "disk"
    mount.mkdir()
    # one tiny checkpoint is ~0.55 MB: room for the first, not for the second
    done = _on_tmpfs(mount, "900k", ["pretrain", "--config", str(config), "--exp-dir", str(mount / "exp")])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: no space left on device: {mount}/exp/checkpoints/step_00000002/" in lines[0]
    assert "step_00000001 is intact" in lines[0]
    after = w / "disk.after" / "exp" / "checkpoints"
    assert [p.name for p in after.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
    assert ckpt.latest_checkpoint(after).name == "step_00000001"
    weights, state = ckpt.load_checkpoint(after / "step_00000001")
    assert state["step"] == 1 and weights


def test_convert_onto_a_full_disk_names_the_file_and_leaves_no_partial_model(workspace: Path) -> None:
    mount = workspace / "small"
    mount.mkdir()
    done = _on_tmpfs(mount, "64k", ["convert", str(workspace / "model"), str(mount / "hf"), "--from", "speechvq",
                                    "--to", "hf"])  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].endswith(f"no space left on device: {mount}/hf"), done.stderr
    assert list((workspace / "small.after").iterdir()) == []  # neither a partial model nor its temporary
