"""tools/dev.py: which torch build the dev install asks for, on which machine.

The last test runs pip itself (offline, against two local indexes standing in for PyPI and
PyTorch's CPU index) to show the rule the install relies on: with the CPU index as an extra index,
``torch==2.13.0`` resolves to ``2.13.0+cpu`` and no CUDA package.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.util
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import pytest

from local_http import url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dev(monkeypatch):
    spec = importlib.util.spec_from_file_location("speechvq_dev_tool", ROOT / "tools" / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("SPEECHVQ_TORCH_INDEX", raising=False)
    monkeypatch.setattr(module.sys, "platform", "linux")
    return module


def test_linux_without_a_gpu_takes_the_cpu_index(dev, monkeypatch):
    monkeypatch.setattr(dev, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(dev, "index_reachable", lambda u: u == dev.TORCH_CPU_INDEX)
    index, why = dev.torch_source()
    assert index == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert "CPU build" in why
    # both pinned installs carry it (a dependency resolved later must not pull another build)
    pinned = [cmd for cmd in dev.install_commands(index) if "requirements/constraints.txt" in cmd]
    assert len(pinned) == 2 and all(cmd[cmd.index(index[0]) + 1] == index[1] for cmd in pinned)
    assert pinned[0][-1] == "torch" and pinned[1][-2:] == ["-e", ".[dev]"]


def test_unreachable_cpu_index_falls_back_to_the_configured_one_and_says_so(dev, monkeypatch):
    monkeypatch.setattr(dev, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(dev, "index_reachable", lambda u: False)
    index, why = dev.torch_source()
    assert index == [] and "cannot be reached" in why and "SPEECHVQ_TORCH_INDEX" in why


def test_a_gpu_keeps_the_configured_index_and_the_override_wins(dev, monkeypatch):
    monkeypatch.setattr(dev, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(dev, "index_reachable", lambda u: pytest.fail("no index probe with a GPU"))
    assert dev.torch_source()[0] == []
    monkeypatch.setenv("SPEECHVQ_TORCH_INDEX", "https://mirror.example/cpu")
    assert dev.torch_source()[0] == ["--extra-index-url", "https://mirror.example/cpu"]


def test_index_reachable_asks_the_index_for_torch(dev, server):
    assert not dev.index_reachable(url(server))  # 404: no torch there
    server.files["torch/"] = b"<html></html>"
    assert dev.index_reachable(url(server) + "/")
    server.shutdown()
    server.server_close()
    assert not dev.index_reachable(url(server), timeout_s=2.0)


def test_has_nvidia_gpu_reads_nvidia_smi(dev, monkeypatch, tmp_path):
    monkeypatch.setattr(dev, "Path", _NoProcPath)  # no /proc/driver/nvidia on this machine either way
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not dev.has_nvidia_gpu()  # no nvidia-smi
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    assert dev.has_nvidia_gpu()
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    assert not dev.has_nvidia_gpu()


class _NoProcPath(type(Path())):  # type: ignore[misc]
    def is_dir(self) -> bool:
        return False if str(self).startswith("/proc/driver/nvidia") else super().is_dir()


def _wheel(directory: Path, name: str, version: str, requires: list[str]) -> str:
    """A minimal pure-Python wheel with these requirements; returns its file name."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)
        ),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    filename = f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(directory / filename, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return filename


def _simple_index(root: Path, wheels: dict[str, list[str]]) -> None:
    for project, filenames in wheels.items():
        (root / project).mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="../files/{f}">{f}</a>\n' for f in filenames)
        (root / project / "index.html").write_text(f"<!DOCTYPE html><html><body>{links}</body></html>")


def test_pip_takes_the_cpu_build_from_the_extra_index(tmp_path):
    # "PyPI": torch 2.13.0 needing a CUDA package; "CPU index": torch 2.13.0+cpu needing nothing
    pypi, cpu = tmp_path / "pypi", tmp_path / "cpu"
    for index in (pypi, cpu):
        (index / "files").mkdir(parents=True)
    _simple_index(
        pypi,
        {
            "torch": [_wheel(pypi / "files", "torch", "2.13.0", ["nvidia-cublas==13.1"])],
            "nvidia-cublas": [_wheel(pypi / "files", "nvidia_cublas", "13.1", [])],
        },
    )
    _simple_index(cpu, {"torch": [_wheel(cpu / "files", "torch", "2.13.0+cpu", [])]})
    servers = []
    for index in (pypi, cpu):
        handler = partial(_QuietHandler, directory=str(index))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        __import__("threading").Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    try:
        cmd = [
            sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
            "--disable-pip-version-check", "--index-url", f"{url(servers[0])}/",
            "--extra-index-url", f"{url(servers[1])}/", "-c", str(ROOT / "requirements" / "constraints.txt"),
            "torch",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "Would install torch-2.13.0+cpu" in result.stdout
        assert "nvidia" not in result.stdout
        # and without the CPU index the same pin is the CUDA build
        cmd_pypi_only = [c for c in cmd if c not in ("--extra-index-url", f"{url(servers[1])}/")]
        result = subprocess.run(cmd_pypi_only, capture_output=True, text=True, timeout=120)
        assert "torch-2.13.0\n" in result.stdout and "nvidia" in result.stdout.lower()
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass
