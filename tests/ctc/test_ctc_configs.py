"""conf/finetune_*.yaml: every file parses into a valid CtcConfig and carries the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from speechvq.config import wav2vec2_base
from speechvq.models.ctc import ctc_config_from_wav2vec2
from speechvq.train.finetune import MODEL_CHOICE_FIELDS

CONF = Path(__file__).resolve().parents[2] / "conf"
BUDGETS = ["10min", "1h", "10h", "100h", "960h", "small_cpu"]
SECTIONS = {"model", "mask", "data", "optim", "schedule", "train"}


def _load(name: str) -> dict:
    return yaml.safe_load((CONF / f"finetune_{name}.yaml").read_text())


@pytest.mark.parametrize("name", BUDGETS)
def test_finetune_config_builds_a_ctc_config(name):
    conf = _load(name)
    assert set(conf) == SECTIONS
    settings = {k: v for k, v in conf["model"].items() if k not in MODEL_CHOICE_FIELDS}
    cfg = ctc_config_from_wav2vec2(wav2vec2_base(), 32, mask=conf["mask"], **settings)
    assert cfg.encoder.grad_mult == 0.0
    assert conf["schedule"]["name"] == "tri_stage" and conf["schedule"]["phase_ratio"] == [0.1, 0.4, 0.5]


@pytest.mark.parametrize(
    ("name", "lr", "steps", "freeze", "mask_prob", "channel_prob", "layer_drop"),
    [
        ("10min", 5e-5, 13000, 10000, 0.65, 0.25, 0.1),
        ("1h", 5e-5, 13000, 10000, 0.65, 0.25, 0.1),
        ("10h", 5e-5, 20000, 10000, 0.65, 0.5, 0.05),
        ("100h", 3e-5, 80000, 0, 0.65, 0.5, 0.1),
        ("960h", 1e-4, 320000, 0, 0.5, 0.1, 0.1),
    ],
)
def test_finetune_config_has_fairseq_base_hyperparameters(
    name, lr, steps, freeze, mask_prob, channel_prob, layer_drop
):
    conf = _load(name)
    assert conf["optim"]["lr"] == lr and conf["train"]["max_steps"] == steps
    assert conf["model"]["freeze_updates"] == freeze and conf["model"]["layer_drop_p"] == layer_drop
    assert conf["mask"]["mask_prob"] == mask_prob and conf["mask"]["channel_prob"] == channel_prob
    assert conf["mask"]["channel_length"] == 64 and conf["optim"]["eps"] == 1e-8


@pytest.mark.parametrize("name", BUDGETS)
def test_finetune_config_loads_into_the_loop_config(name):
    from speechvq.train.config import load_config
    from speechvq.train.finetune import FinetuneConfig

    cfg = load_config(CONF / f"finetune_{name}.yaml", ["train.max_steps=7"], FinetuneConfig)
    conf = _load(name)
    assert cfg.train.max_steps == 7 and cfg.model.freeze_updates == conf["model"]["freeze_updates"]
    assert cfg.schedule.name == "tri_stage" and cfg.mask.channel_length == conf["mask"]["channel_length"]
