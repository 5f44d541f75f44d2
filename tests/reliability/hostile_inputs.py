"""Hostile inputs for every command: the workspace they start from and the builders of each case.

Each case builds its bad input inside a fresh copy of the workspace and returns the command line.
``test_reliability_hostile_inputs.py`` runs them all through ``speechvq.cli.main``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml
from bad_inputs import SR, make_workspace


@dataclass(frozen=True)
class Case:
    """One hostile input and what must come of it."""

    argv: Callable[[Path], list[str]]
    """Workspace -> command line (the case writes its bad input into the workspace first)."""
    expect: tuple[str, ...]
    """Substrings of the one error line (``error``), or of a warning counting the skip (``skip``)."""
    outcome: str = "error"
    """``error``: exit code 2 and one stderr line. ``skip``: exit code 0, the bad item skipped and
    counted in a warning."""


# -- the workspace -------------------------------------------------------------------------------------


def make_hostile_workspace(root: Path) -> Path:
    """``bad_inputs.make_workspace`` plus run configs, letter labels, a pretraining experiment with a
    checkpoint, a LibriSpeech-style tree and a unit-BERT config."""
    from speechvq.cli import main

    w = make_workspace(root)
    (w / "good.ltr").write_text("H E L L O |\nW O R L D |\n")
    run = {"progress_bar": False, "tensorboard": False, "log_interval": 1, "save_interval": 1}
    (w / "pt.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": {"train": str(w / "good.tsv"), "min_sample_size": 1000, "max_tokens": 100000},
                "schedule": {"warmup_steps": 0},
                "train": {"max_steps": 1, **run},
            }
        )
    )
    (w / "ft.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny", "freeze_updates": 0},
                "data": {"max_tokens": 100000},
                "schedule": {"name": "constant", "warmup_steps": 0},
                "train": {"max_steps": 1, "valid_interval": 1, **run},
            }
        )
    )
    unit_bert = yaml.safe_load((Path(__file__).parents[2] / "conf" / "unit_bert_tiny.yaml").read_text())
    unit_bert["train"].update(max_steps=1, **run)
    (w / "ub.yaml").write_text(yaml.safe_dump(unit_bert))
    split = w / "L" / "train" / "1" / "2"
    split.mkdir(parents=True)
    (split / "1-2.trans.txt").write_text("1-2-0 HELLO\n")
    sf.write(split / "1-2-0.flac", np.zeros(8000, np.float32), SR)
    pretrain = ["pretrain", "--config", str(w / "pt.yaml"), "--exp-dir", str(w / "pexp")]
    assert main(["--log-level", "ERROR", *pretrain]) == 0
    ub = [
        "pretrain-unit-bert",
        "--config",
        str(w / "ub.yaml"),
        "--units",
        str(w / "units"),
        "--exp-dir",
        str(w / "uexp"),
    ]
    assert main(["--log-level", "ERROR", *ub]) == 0
    (w / "fu.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"freeze_updates": 0},
                "data": {"max_tokens": 2000},
                "schedule": {"name": "constant", "warmup_steps": 0},
                "train": {"max_steps": 1, "valid_interval": 1, **run},
            }
        )
    )
    return w


# -- writing bad inputs ----------------------------------------------------------------------------------


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def manifest(w: Path, name: str, *items: tuple[str, int], root: Path | None = None) -> Path:
    """A manifest of ``items`` (relpath, samples) under ``root`` (default: the workspace)."""
    return write(w / name, f"{root or w}\n" + "".join(f"{a}\t{n}\n" for a, n in items))


def fifo(path: Path) -> Path:
    """A FIFO at ``path``: opening it for reading would block until a writer comes."""
    os.mkfifo(path)
    return path


def truncated_wav(w: Path, name: str = "t.wav") -> Path:
    """A WAV cut in half: its header still declares every sample."""
    data = (w / "a0.wav").read_bytes()
    return write(w / name, data[: len(data) // 2])


def float_wav(w: Path, name: str, value: float) -> Path:
    sf.write(w / name, np.full(8000, value, np.float32), SR, subtype="FLOAT")
    return w / name


def fairseq_pt(w: Path, model_cfg: dict) -> Path:
    """A fairseq-style checkpoint of plain dicts (allowed by the safe loader) with ``model_cfg``."""
    path = w / "fs.pt"
    torch.save({"model": {}, "cfg": {"model": {"_name": "wav2vec2", **model_cfg}}}, path)
    return path


def huge_npy_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A ``.npy`` whose header claims ``shape`` but which holds no data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return write(path, b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def gzip_bomb(path: Path, size: int) -> Path:
    """A tar.gz of one file of ``size`` zero bytes (~1000x smaller than what it expands to)."""
    with gzip.open(path, "wb", compresslevel=9) as gz:
        info = tarfile.TarInfo("LibriSpeech/zeros.flac")
        info.size = size
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        block = bytes(1 << 20)
        for _ in range(size // len(block)):
            gz.write(block)
        gz.write(bytes(-size % 512 + 1024))  # padding and the two end blocks
    return path


def billion_laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\nmodel: {preset: tiny}\n"


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def units_dir(w: Path, units: str | bytes, meta: dict | None = None, durations: str | None = None) -> Path:
    write(w / "units" / "units.txt", units)
    if meta is not None:
        write(w / "units" / "meta.json", json.dumps(meta))
    if durations is not None:
        write(w / "units" / "durations.txt", durations)
    return w / "units"
