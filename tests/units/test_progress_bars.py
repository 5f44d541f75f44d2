"""Progress bars with rates on every command that walks a corpus (``--progress always``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from speechvq.cli import main
from speechvq.io import save_pretrained
from speechvq.models.wav2vec2 import Wav2Vec2Model


def _bar(err: str, desc: str, total: int, unit: str = "utt") -> bool:
    """Whether ``err`` holds a finished ``desc`` bar over ``total`` with a rate in ``unit``/s."""
    return re.search(rf"{re.escape(desc)}: 100%\|.*\| {total}/{total} \[[^\]]*{unit}/s", err) is not None


@pytest.mark.parametrize("flag", ["--progress", "env"])
def test_export_units_and_fit_kmeans_show_their_bars(
    tiny_model, manifest, tmp_path, capsys, flag, monkeypatch
):
    save_pretrained(tiny_model, tmp_path / "model")
    progress = ["--progress", "always"] if flag == "--progress" else []
    if flag == "env":
        monkeypatch.setenv("SPEECHVQ_PROGRESS", "always")
    argv = ["fit-kmeans", str(tmp_path / "model"), str(manifest), "--layer", "1", "--k", "3", "--n-init", "1"]
    assert main([*progress, *argv, "--max-iter", "3", "--out", str(tmp_path / "km")]) == 0
    err = capsys.readouterr().err
    assert _bar(err, "fit-kmeans: features", 7) and "x real time" in err
    argv = ["export-units", str(tmp_path / "model"), str(manifest), "--out", str(tmp_path / "units")]
    assert main([*progress, *argv, "--kind", "codes"]) == 0
    err = capsys.readouterr().err
    assert _bar(err, "export-units", 7) and " s audio" in err


def test_validate_and_manifest_show_their_bars(manifest: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "--progress",
                "always",
                "manifest",
                str(manifest.parent),
                "--ext",
                "wav",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert _bar(capsys.readouterr().err, "manifest", 7, unit="file")
    main(["--progress", "always", "validate", str(manifest)])  # one item is too short: a problem, exit 1
    assert _bar(capsys.readouterr().err, "validate", 7)


def test_no_bar_by_default_off_a_terminal_or_with_never(
    tiny_model: Wav2Vec2Model, manifest, tmp_path, capsys
) -> None:
    save_pretrained(tiny_model, tmp_path / "model")
    argv = ["export-units", str(tmp_path / "model"), str(manifest), "--kind", "codes"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0  # pytest's stderr is not a terminal
    assert "export-units:" not in capsys.readouterr().err
    assert main(["--progress", "never", *argv, "--out", str(tmp_path / "b")]) == 0
    assert "export-units:" not in capsys.readouterr().err
