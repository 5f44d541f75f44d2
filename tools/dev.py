#!/usr/bin/env python3
"""Set up the development environment and run the demo or the tests.

Usage:
    python3 tools/dev.py demo     # create .venv if needed, install, run the demo
    python3 tools/dev.py test     # create .venv if needed, install, run lint + the test suite
    python3 tools/dev.py setup    # only create/update .venv

Needs nothing but Python 3.10+. torch is pinned by requirements/constraints.txt (the CPU build);
the install is skipped when pyproject.toml and the constraints have not changed since the last one.
Extra arguments after ``test`` go to pytest (e.g. ``-m slow``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".speechvq-install-stamp"


def run(cmd: list[str | Path], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)


def setup() -> None:
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "requirements/constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    if STAMP.exists() and STAMP.read_text() == digest.hexdigest():
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run([*pip, "--upgrade", "pip"])
    # torch first, from the pin, so that nothing later resolves a CUDA build
    run([*pip, "-c", "requirements/constraints.txt", "torch"])
    run([*pip, "-c", "requirements/constraints.txt", "-e", ".[dev]"])
    STAMP.write_text(digest.hexdigest())


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
