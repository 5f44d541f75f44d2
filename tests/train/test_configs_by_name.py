"""Shipped configs: selectable by name on every command, and installed with the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from speechvq import cli
from speechvq.configs import bundled_configs, resolve_config
from speechvq.errors import UserInputError
from speechvq.train.config import load_config
from speechvq.train.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_in_conf_is_shipped_and_resolves_by_name() -> None:
    names = {p.stem for p in (ROOT / "conf").glob("*.yaml")}
    assert names and set(bundled_configs()) == names
    for name in names:
        assert resolve_config(name).read_bytes() == (ROOT / "conf" / f"{name}.yaml").read_bytes()
        assert resolve_config(f"{name}.yaml") == resolve_config(name)


def test_a_path_wins_over_a_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain_tiny.yaml").write_text("model: {preset: tiny}\n")
    assert resolve_config("pretrain_tiny.yaml") == Path("pretrain_tiny.yaml")  # the local file
    assert resolve_config("pretrain_tiny") != Path("pretrain_tiny.yaml")  # no suffix: the shipped one


def test_load_config_by_name() -> None:
    cfg = load_config("pretrain_small_cpu", ["data.train=x.tsv"])
    assert cfg.model.preset == "small"
    assert isinstance(load_config("finetune_small_cpu", ["data.train=x.tsv"], FinetuneConfig), FinetuneConfig)


def test_unknown_name_is_one_line_naming_the_shipped_configs(capsys, tmp_path) -> None:
    with pytest.raises(UserInputError, match=r"no shipped config has this name.*pretrain_small_cpu"):
        resolve_config("pretrain_smal_cpu")
    assert cli.main(["pretrain", "--config", "pretrain_smal_cpu", "--exp-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pretrain_smal_cpu: config file not found" in err


def test_pretrain_command_runs_a_config_given_by_name(tmp_path, corpus) -> None:
    # the command line as a pip-installed user types it: no path to the repository's conf/
    argv = [
        "pretrain", "--config", "pretrain_tiny", "--exp-dir", str(tmp_path / "exp"),
        "--set", f"data.train={corpus}", "train.max_steps=2", "train.progress_bar=false",
        "train.tensorboard=false", "data.max_tokens=64000",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert (tmp_path / "exp" / "checkpoints").is_dir()


def test_the_wheel_ships_the_configs_and_they_resolve_from_it(tmp_path) -> None:
    # build the wheel offline (hatchling from the dev install), install it into a folder and
    # resolve a name from there, with no repository checkout on the path
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("speechvq-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {
            Path(n).stem for n in zf.namelist() if n.startswith("speechvq/conf/") and n.endswith(".yaml")
        }
    assert shipped == {p.stem for p in (ROOT / "conf").glob("*.yaml")}
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    code = "import speechvq.configs as c; print(c.resolve_config('pretrain_small_cpu'))"
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    ).stdout.strip()
    assert Path(out) == site / "speechvq" / "conf" / "pretrain_small_cpu.yaml"
