from __future__ import annotations

from pathlib import Path

import pytest

from speechvq.errors import UserInputError
from speechvq.train.config import config_from_dict, dump_config, load_config

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("name", ["tiny", "small_cpu", "base", "large"])
def test_load_config_reads_every_shipped_config(name: str) -> None:
    cfg = load_config(CONF / f"pretrain_{name}.yaml", ["data.train=x.tsv"])
    preset_name = {"small_cpu": "small"}.get(name, name)
    assert cfg.model.preset == preset_name
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.01
    cfg.model_config()


def test_load_config_applies_typed_overrides() -> None:
    cfg = load_config(
        CONF / "pretrain_tiny.yaml",
        [
            "data.train=x.tsv",
            "optim.lr=5e-4",
            "train.max_steps=7",
            "model.context.dropout_p=0",
            "schedule.phase_ratio=[0.2,0.3,0.5]",
        ],
    )
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.model_config().context.dropout_p == 0.0
    assert cfg.schedule.phase_ratio == (0.2, 0.3, 0.5)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.max_steps=ten", r"`train.max_steps` must be of type int"),
        ("train.precision=fp8", r"`train.precision` must be one of"),
        ("optim.lrr=1", r"`optim.lrr` is not a config field"),
        ("model.context.nope=1", r"`context.nope` is not a config field"),
        ("train.grad_accum=0", r"`train.grad_accum` must be an integer >= 1"),
        ("noequals", r"--set must be KEY=VALUE"),
    ],
)
def test_load_config_raises_when_override_is_invalid(override: str, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        load_config(CONF / "pretrain_tiny.yaml", ["data.train=x.tsv", override])


def test_load_config_names_file_and_line_of_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(UserInputError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)


def test_dump_config_round_trips_with_the_full_model_config() -> None:
    cfg = load_config(CONF / "pretrain_tiny.yaml", ["data.train=x.tsv", "model.quantizer.codebook_size=8"])
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.model_config() == cfg.model_config()
    assert again.model_config().quantizer.codebook_size == 8
    assert again.train == cfg.train
