"""recipes/librispeech/prepare.sh against a local server and a tiny LibriSpeech/Libri-light tree."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from local_http import FIXTURES, libri_tarball, url
from speechvq.data import read_labels, read_manifest

RECIPE = Path(__file__).parents[2] / "recipes" / "librispeech"


def _run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        ["bash", str(RECIPE / "prepare.sh"), *args], capture_output=True, text=True, env=env, **kw
    )


def _librilight_tree(root: Path) -> Path:
    """librispeech_finetuning layout filled with copies of the real LibriSpeech excerpt."""
    src = FIXTURES / "test-clean"
    for part in ["1h/0/clean", "1h/1/other", "9h/clean"]:
        shutil.copytree(src, root / part)
    return root


def test_prepare_runs_stage_by_stage_and_skips_done_stages(server, tmp_path: Path):
    data = libri_tarball("dev-clean")
    server.files["dev-clean.tar.gz"] = data
    (tmp_path / "md5sum.txt").write_text(f"{hashlib.md5(data).hexdigest()}  dev-clean.tar.gz\n")
    common = [
        "--dl-dir", str(tmp_path / "download"), "--data-dir", str(tmp_path / "data"),
        "--subsets", "dev-clean", "--mirror", url(server), "--checksums", str(tmp_path / "md5sum.txt"),
        "--librilight-dir", str(_librilight_tree(tmp_path / "librispeech_finetuning")),
    ]  # fmt: skip
    for stage in range(4):
        done = _run([*common, "--stage", str(stage), "--stop-stage", str(stage)])
        assert done.returncode == 0, done.stderr
        assert f"Stage {stage}:" in done.stderr
        assert (tmp_path / "data" / ".done" / f".stage{stage}.done").is_file()

    manifest = read_manifest(tmp_path / "data" / "manifests" / "dev-clean.tsv")
    assert len(manifest.items) == len(list((FIXTURES / "test-clean").rglob("*.flac")))
    assert len(read_labels(tmp_path / "data" / "manifests" / "dev-clean.ltr")) == len(manifest.items)
    sets = {
        name: read_manifest(tmp_path / "data" / "librilight" / f"{name}.tsv")
        for name in ("10min", "1h", "10h")
    }
    assert len(sets["10min"].items) < len(sets["1h"].items) < len(sets["10h"].items)
    assert all((sets["10h"].root / item.relpath).is_file() for item in sets["10h"].items)

    # everything is done: a full re-run skips every stage and changes nothing
    before = (tmp_path / "data" / "manifests" / "dev-clean.tsv").stat().st_mtime_ns
    requests = len(server.ranges)
    again = _run(common)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already done") == 4
    assert (tmp_path / "data" / "manifests" / "dev-clean.tsv").stat().st_mtime_ns == before
    assert len(server.ranges) == requests


def test_prepare_stops_on_a_checksum_mismatch(server, tmp_path: Path):
    server.files["dev-clean.tar.gz"] = libri_tarball("dev-clean")
    (tmp_path / "md5sum.txt").write_text(f"{'0' * 32}  dev-clean.tar.gz\n")
    done = _run(
        ["--dl-dir", str(tmp_path / "dl"), "--data-dir", str(tmp_path / "data"), "--subsets", "dev-clean",
         "--mirror", url(server), "--checksums", str(tmp_path / "md5sum.txt")]
    )  # fmt: skip
    assert done.returncode != 0
    assert "MD5" in done.stderr or "md5" in done.stderr
    assert not (tmp_path / "data" / ".done" / ".stage0.done").exists()


def test_every_prepare_stage_dry_runs_without_touching_anything(tmp_path: Path):
    done = _run(["--dry-run", "true", "--dl-dir", str(tmp_path / "dl"), "--data-dir", str(tmp_path / "data"),
                 "--librilight-dir", str(tmp_path / "ll")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    for stage in range(4):
        assert f"Stage {stage}:" in done.stderr
    assert "+ speechvq download-librispeech --subset train-other-500" in done.stderr
    assert "+ speechvq prepare-librispeech" in done.stderr
    assert "+ speechvq validate" in done.stderr
    assert "make_librilight_sets.py" in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "dl").exists()


def test_parse_options_rejects_unknown_options_and_lists_them_on_help():
    bad = _run(["--no-such-option", "1"])
    assert bad.returncode == 2 and "unknown option --no-such-option" in bad.stderr
    helped = _run(["--help"])
    assert helped.returncode == 0 and "--stop-stage" in helped.stderr and "--dl-dir" in helped.stderr
