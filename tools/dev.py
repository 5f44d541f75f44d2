#!/usr/bin/env python3
"""Set up the development environment and run the demo or the tests.

Usage:
    python3 tools/dev.py demo     # create .venv if needed, install, run the demo
    python3 tools/dev.py test     # create .venv if needed, install, run lint + the test suite
    python3 tools/dev.py setup    # only create/update .venv

Needs nothing but Python 3.10+. torch's version is pinned by requirements/constraints.txt; which
build of it is installed depends on the machine (:func:`torch_source`): on Linux without an NVIDIA
GPU the CPU build, from PyTorch's CPU wheel index (about 180 MiB, where the CUDA build from PyPI is
about 2.6 GiB), falling back to the configured index when that one cannot be reached; with an
NVIDIA GPU the CUDA build from the configured index. ``SPEECHVQ_TORCH_INDEX=URL`` chooses the index.
The install is skipped when pyproject.toml, the constraints and that choice have not changed since
the last one. Extra arguments after ``test`` go to pytest (e.g. ``-m slow``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".speechvq-install-stamp"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
"""PyTorch's index of CPU-only wheels (``torch==X`` resolves to ``X+cpu`` there)."""


def run(cmd: list[str | Path], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)


def has_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU with its driver (``nvidia-smi`` lists one, or the
    driver's /proc entry exists)."""
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def index_reachable(url: str, timeout_s: float = 8.0) -> bool:
    """Whether the package index at ``url`` answers for torch (pip itself would retry for minutes)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/torch/", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def torch_source() -> tuple[list[str], str]:
    """The pip arguments that choose torch's build for this machine, and a line saying which.

    Linux without an NVIDIA GPU: PyTorch's CPU index as an extra index (``torch==X+cpu`` is a
    higher version than PyPI's CUDA ``X``, so pip takes it), unless it cannot be reached. With a
    GPU, and on macOS and Windows (where PyPI's torch has no CUDA libraries to download), the
    configured index alone. ``SPEECHVQ_TORCH_INDEX`` overrides the choice.
    """
    override = os.environ.get("SPEECHVQ_TORCH_INDEX", "").strip()
    if override:
        return ["--extra-index-url", override], f"torch from {override} (SPEECHVQ_TORCH_INDEX)"
    if not sys.platform.startswith("linux"):
        return [], f"torch from the configured index (on {sys.platform} it has no CUDA libraries)"
    if has_nvidia_gpu():
        return [], "an NVIDIA GPU is present: torch's CUDA build from the configured index"
    if index_reachable(TORCH_CPU_INDEX):
        return [
            "--extra-index-url",
            TORCH_CPU_INDEX,
        ], f"no NVIDIA GPU: torch's CPU build from {TORCH_CPU_INDEX}"
    return [], (
        f"no NVIDIA GPU, but {TORCH_CPU_INDEX} cannot be reached: torch from the configured index "
        "(from PyPI that is the CUDA build, about 2.6 GiB; set SPEECHVQ_TORCH_INDEX to a CPU index)"
    )


def setup() -> None:
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "requirements/constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    digest.update(os.environ.get("SPEECHVQ_TORCH_INDEX", "").encode())
    if STAMP.exists() and STAMP.read_text() == digest.hexdigest():
        return
    index, why = torch_source()
    print(f"dev.py: {why}", flush=True)
    for cmd in install_commands(index):
        run(cmd)
    STAMP.write_text(digest.hexdigest())


def install_commands(index: list[str]) -> list[list[str | Path]]:
    """The pip commands of the dev install, with ``index`` (:func:`torch_source`'s arguments)."""
    pip: list[str | Path] = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    pinned = [*pip, *index, "-c", "requirements/constraints.txt"]
    return [
        [*pip, "--upgrade", "pip"],
        [*pinned, "torch"],  # torch first, from the pin, so that nothing later resolves another build
        [*pinned, "-e", ".[dev]"],
    ]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if argv[0] == "demo":
        run(["bash", "recipes/toy/run.sh", *argv[1:]], env=env)
    elif argv[0] == "test":
        run([BIN / "ruff", "check", "."], env=env)
        run([BIN / "ruff", "format", "--check", "."], env=env)
        run([PY, "-m", "pytest", *argv[1:]], env=env)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
