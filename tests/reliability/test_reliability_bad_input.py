"""The bad-input matrix: every command that reads a user file answers a broken one with one line
naming the file (and line) and the problem, and exit code 2 — never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import make_workspace

from speechvq.cli import main

Case = Callable[[Path], tuple[list[str], list[str]]]  # workspace -> (argv, substrings of the error)


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _export(w: Path, manifest: Path) -> list[str]:
    return ["export-units", str(w / "model"), str(manifest), "--kind", "codes", "--out", str(w / "out")]


def _export_km(w: Path, km: Path) -> list[str]:
    return ["export-units", str(w / "model"), str(w / "good.tsv"), "--kind", "kmeans", "--layer", "1",
            "--km", str(km), "--out", str(w / "out")]  # fmt: skip


def _pretrain(w: Path, config: Path, *sets: str) -> list[str]:
    argv = ["pretrain", "--config", str(config), "--exp-dir", str(w / "exp")]
    return argv + (["--set", *sets] if sets else [])


def _unit_quality(w: Path) -> list[str]:
    return ["unit-quality", str(w / "units"), str(w / "ali")]


def _units(w: Path, units: str, meta: dict | None = None) -> None:
    _write(w / "units" / "units.txt", units)
    if meta is not None:
        _write(w / "units" / "meta.json", json.dumps(meta))


def _model_without(w: Path, name: str) -> Path:
    (w / "model" / name).unlink()
    return w / "model"


def _bad_km(w: Path, meta: str | None = None, centroids: np.ndarray | bytes | None = None) -> Path:
    if meta is not None:
        _write(w / "km" / "kmeans.json", meta)
    if isinstance(centroids, np.ndarray):
        np.save(w / "km" / "centroids.npy", centroids)
    elif centroids is not None:
        _write(w / "km" / "centroids.npy", centroids)
    return w / "km"


KM_META = json.dumps({"format": "speechvq-kmeans", "k": 4, "dim": 8})

CASES: dict[str, Case] = {
    # manifests
    "manifest-missing": lambda w: (_export(w, w / "nope.tsv"), ["nope.tsv", "does not exist"]),
    "manifest-missing-root": lambda w: (
        _export(w, _write(w / "m.tsv", f"{w}/no_such_dir\na0.wav\t8000\n")),
        ["m.tsv", "no_such_dir", "root"],
    ),
    "manifest-empty-root-line": lambda w: (
        _export(w, _write(w / "m.tsv", "\na0.wav\t8000\n")),
        ["m.tsv:1:", "audio root directory"],
    ),
    "manifest-bad-length": lambda w: (
        _export(w, _write(w / "m.tsv", f"{w}\na0.wav\tmany\n")),
        ["m.tsv:2:", "must be an integer"],
    ),
    "manifest-wrong-column-count": lambda w: (
        _export(w, _write(w / "m.tsv", f"{w}\na0.wav\t8000\textra\n")),
        ["m.tsv:2:", "3 tab-separated"],
    ),
    "manifest-negative-length": lambda w: (
        _export(w, _write(w / "m.tsv", f"{w}\na0.wav\t8000\na1.wav\t-5\n")),
        ["m.tsv:3:", ">= 0"],
    ),
    "manifest-not-utf8": lambda w: (_export(w, _write(w / "m.tsv", b"\xff\xfe\n")), ["m.tsv", "UTF-8"]),
    "manifest-bad-line-via-pretrain-config": lambda w: (
        _pretrain(
            w,
            w / "config.yaml",
            f"data.train={_write(w / 'm.tsv', str(w) + chr(10) + 'a0.wav' + chr(9) + 'x')}",
        ),
        ["m.tsv:2:", "must be an integer"],
    ),
    "manifest-bad-line-via-fit-kmeans": lambda w: (
        [
            "fit-kmeans",
            str(w / "model"),
            str(_write(w / "m.tsv", f"{w}\na0.wav\t8000\t1\n")),
            "--layer",
            "1",
            "--k",
            "2",
            "--out",
            str(w / "km2"),
        ],
        ["m.tsv:2:"],
    ),
    "manifest-bad-line-via-transcribe": lambda w: (
        ["transcribe", str(w / "ctc"), str(_write(w / "m.tsv", f"{w}\na0.wav\t-1\n"))],
        ["m.tsv:2:", ">= 0"],
    ),
    # label files
    "labels-line-count-mismatch": lambda w: (
        ["transcribe", str(w / "ctc"), str(w / "good.tsv"), "--labels", str(_write(w / "l.wrd", "ONE\n"))],
        ["l.wrd", "1 lines", "2 inputs"],
    ),
    "labels-not-utf8": lambda w: (
        [
            "transcribe",
            str(w / "ctc"),
            str(w / "good.tsv"),
            "--labels",
            str(_write(w / "l.wrd", b"A\n\xff\n")),
        ],
        ["l.wrd:2:", "UTF-8"],
    ),
    "labels-missing": lambda w: (
        ["transcribe", str(w / "ctc"), str(w / "good.tsv"), "--labels", str(w / "none.wrd")],
        ["none.wrd", "does not exist"],
    ),
    # unit files
    "units-out-of-range-id": lambda w: (
        (_units(w, "1 1 2\n3 7\n"), _unit_quality(w))[1],
        ["units.txt:2:", "7", "out of range"],
    ),
    "units-negative-id": lambda w: (
        (_units(w, "1 -1 2\n3 0\n"), _unit_quality(w))[1],
        ["units.txt:1:", "-1"],
    ),
    "units-non-integer-token": lambda w: (
        (_units(w, "1 x 2\n3 0\n"), _unit_quality(w))[1],
        ["units.txt:1:", "'x'", "not an integer id"],
    ),
    "units-line-count-mismatch": lambda w: (
        (_write(w / "units" / "utts.txt", "a0.wav\n"), _unit_quality(w))[1],
        ["utts.txt", "1 lines"],
    ),
    "units-bad-meta-json": lambda w: (
        (_write(w / "units" / "meta.json", "{oops"), _unit_quality(w))[1],
        ["meta.json", "invalid JSON"],
    ),
    "units-missing": lambda w: (
        (shutil.rmtree(w / "units"), _unit_quality(w))[1],
        ["units", "does not exist"],
    ),
    "units-bad-durations": lambda w: (
        (
            _units(w, "1 2\n3 0\n", {"frame_stride_s": 0.02, "dedup": True}),
            _write(w / "units" / "durations.txt", "1 z\n1 1\n"),
            _unit_quality(w),
        )[2],
        ["durations.txt:1:", "integers"],
    ),
    # configs
    "config-wrong-type": lambda w: (
        _pretrain(w, _write(w / "c.yaml", "model: {preset: tiny}\ntrain: {max_steps: many}\n")),
        ["c.yaml", "train.max_steps", "many"],
    ),
    "config-unknown-key": lambda w: (
        _pretrain(w, _write(w / "c.yaml", "model: {preset: tiny}\ntrain: {max_stepz: 3}\n")),
        ["c.yaml", "max_stepz"],
    ),
    "config-unknown-section": lambda w: (
        _pretrain(w, _write(w / "c.yaml", "model: {preset: tiny}\ntrian: {}\n")),
        ["c.yaml", "trian"],
    ),
    "config-invalid-yaml": lambda w: (
        _pretrain(w, _write(w / "c.yaml", "model: {preset: tiny\ntrain: [\n")),
        ["c.yaml", "invalid YAML"],
    ),
    "config-not-a-mapping": lambda w: (
        _pretrain(w, _write(w / "c.yaml", "- 1\n- 2\n")),
        ["c.yaml", "mapping"],
    ),
    "config-missing": lambda w: (_pretrain(w, w / "none.yaml"), ["none.yaml", "not found"]),
    "config-unknown-preset": lambda w: (
        _pretrain(w, _write(w / "c.yaml", f"model: {{preset: huge}}\ndata: {{train: {w / 'good.tsv'}}}\n")),
        ["c.yaml", "huge"],
    ),
    "config-bad-override-value": lambda w: (
        _pretrain(w, w / "config.yaml", "optim.lr=fast"),
        ["optim.lr", "fast"],
    ),
    "config-bad-model-override": lambda w: (
        _pretrain(w, w / "config.yaml", "model.context.num_layerz=2"),
        ["num_layerz"],
    ),
    # k-means models
    "kmeans-missing-centroids": lambda w: (
        _export_km(w, ((w / "km" / "centroids.npy").unlink(), w / "km")[1]),
        ["km", "centroids.npy"],
    ),
    "kmeans-centroids-disagree-with-meta": lambda w: (
        _export_km(w, _bad_km(w, KM_META, np.zeros((4, 7), np.float32))),
        ["centroids.npy", "dim=8"],
    ),
    "kmeans-wrong-dims-for-the-model": lambda w: (
        _export_km(
            w,
            _bad_km(
                w, json.dumps({"format": "speechvq-kmeans", "k": 4, "dim": 5}), np.zeros((4, 5), np.float32)
            ),
        ),
        ["km", "dim", "5"],
    ),
    "kmeans-bad-meta-json": lambda w: (_export_km(w, _bad_km(w, "{oops")), ["kmeans.json", "invalid JSON"]),
    "kmeans-meta-without-k": lambda w: (
        _export_km(w, _bad_km(w, json.dumps({"format": "speechvq-kmeans", "dim": 8}))),
        ["kmeans.json", "`k` must be an integer"],
    ),
    "kmeans-centroids-not-npy": lambda w: (
        _export_km(w, _bad_km(w, None, b"not numpy")),
        ["centroids.npy", "not a .npy"],
    ),
    "kmeans-centroids-pickled-object": lambda w: (
        _export_km(w, _bad_km(w, None, np.array([{"a": 1}] * 32, dtype=object).reshape(4, 8))),
        ["centroids.npy"],
    ),
    # model directories
    "model-missing-config": lambda w: (
        _export(w, w / "good.tsv") if _model_without(w, "config.json") else [],
        ["model", "config.json"],
    ),
    "model-missing-weights": lambda w: (
        _export(w, w / "good.tsv") if _model_without(w, "model.safetensors") else [],
        ["model", "model.safetensors"],
    ),
    "model-invalid-config-json": lambda w: (
        (_write(w / "model" / "config.json", "{oops"), _export(w, w / "good.tsv"))[1],
        ["config.json", "invalid JSON"],
    ),
    "model-corrupt-weights": lambda w: (
        (
            _write(w / "model" / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
            _export(w, w / "good.tsv"),
        )[1],
        ["model.safetensors"],
    ),
    "model-missing-via-fit-kmeans": lambda w: (
        [
            "fit-kmeans",
            str(w / "nomodel"),
            str(w / "good.tsv"),
            "--layer",
            "1",
            "--k",
            "2",
            "--out",
            str(w / "k"),
        ],
        ["nomodel", "config.json"],
    ),
    "model-missing-via-convert": lambda w: (
        ["convert", str(w / "nomodel"), str(w / "o"), "--from", "speechvq", "--to", "hf"],
        ["nomodel"],
    ),
    "fairseq-pt-not-a-checkpoint": lambda w: (
        ["convert", str(_write(w / "x.pt", b"junk")), str(w / "o"), "--from", "fairseq", "--to", "speechvq"],
        ["x.pt"],
    ),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("pristine") / "w")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_yields_one_line_naming_file_and_problem_and_exit_code_2(
    name: str, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    w = tmp_path / "w"
    shutil.copytree(pristine, w)
    argv, expected = CASES[name](w)
    capsys.readouterr()
    rc = main(["--log-level", "ERROR", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith(f"speechvq {argv[0]}: error: "), err
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
