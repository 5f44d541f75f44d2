"""`speechvq pretrain-unit-bert`: the MLM loss falls through the command; resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_units_bert import TINY, write_unit_corpus

from speechvq.cli import main
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import load_config
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.unit_bert import UnitBertRunConfig, pretrain_unit_bert
from speechvq.units.bert import load_unit_bert


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("units") / "units"
    write_unit_corpus(root)
    return root


def _config(tmp_path: Path, **train: object) -> Path:
    data = {
        "model": {**TINY, "mask_start_prob": 0.1, "mask_span": 3},
        "data": {"max_tokens": 800},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 60, "log_interval": 10, "valid_interval": 30, "save_interval": 1000,
                  "progress_bar": False, "tensorboard": False, **train},
    }  # fmt: skip
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_pretrain_unit_bert_command_lowers_the_mlm_loss_and_exports(units: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    argv = ["pretrain-unit-bert", "--config", str(_config(tmp_path)), "--units", str(units),
            "--valid-units", str(units), "--exp-dir", str(exp)]  # fmt: skip
    assert main(argv) == 0
    train = [r for r in read_metrics(exp) if r["split"] == "train"]
    assert len(train) == 6
    assert train[0]["loss"] > 2.0 and train[-1]["loss"] < 0.75 * train[0]["loss"]
    model, dictionary, bpe = load_unit_bert(exp / "best_model")
    assert bpe is None and model.config.vocab_size == len(dictionary)
    assert (exp / "dict.txt").is_file()


def test_pretrain_unit_bert_resumes_exactly(units: Path, tmp_path: Path) -> None:
    # dropout on: every RNG matters
    cfg = load_config(
        _config(tmp_path, max_steps=4, grad_accum=2),
        [f"data.train={units}", "model.dropout_p=0.1"],
        UnitBertRunConfig,
    )
    pretrain_unit_bert(cfg, tmp_path / "straight")
    pretrain_unit_bert(cfg, tmp_path / "resumed", stop_at_step=2)
    pretrain_unit_bert(cfg, tmp_path / "resumed", require_resume=True)
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["unit_bert_tiny", "unit_bert_base"])
def test_shipped_unit_bert_configs_load_and_their_warmup_fits_the_run(name: str) -> None:
    # a config without its own schedule inherits the 32k-update pretraining warmup; on a short
    # run the lr then never leaves ~1% of its peak and the BERT learns nothing
    path = Path(__file__).parents[2] / "conf" / f"{name}.yaml"
    cfg = load_config(path, ["data.train=units"], UnitBertRunConfig)
    cfg.validate()
    assert cfg.schedule.warmup_steps <= cfg.train.max_steps // 10
    assert cfg.data.max_tokens >= cfg.model.max_positions


def test_unigram_baseline_is_the_smoothed_unit_frequency_and_the_commonest_unit() -> None:
    import numpy as np

    from speechvq.units.bert_data import unigram_baseline
    from speechvq.units.dictionary import UnitDictionary

    d = UnitDictionary.build([["a", "a", "a", "b"]])
    a, b = d.encode(["a"], add_specials=False)[0], d.encode(["b"], add_specials=False)[0]
    logp, majority = unigram_baseline([np.array([a, a, a, b])], d)
    units = d.mask_id - d.first_unit_id  # 2
    assert majority == a
    assert float(logp[a]) == pytest.approx(np.log((3 + 1) / (4 + units)))
    assert float(logp[b]) == pytest.approx(np.log((1 + 1) / (4 + units)))
    assert torch.isinf(logp[d.pad_id]) and torch.isinf(logp[d.mask_id])  # specials are never targets


def test_records_hold_the_baselines_and_a_learning_bert_beats_them(units: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    argv = ["pretrain-unit-bert", "--config", str(_config(tmp_path)), "--units", str(units),
            "--valid-units", str(units), "--exp-dir", str(exp)]  # fmt: skip
    assert main(argv) == 0
    records = read_metrics(exp)
    last_valid = [r for r in records if r["split"] == "valid"][-1]
    for r in (records[0], last_valid):
        assert {"unigram_ce", "majority_accuracy", "loss_below_unigram"} <= set(r)
    # the corpus: two of 12 units per utterance, in runs: ~ln 12 unigram, ~1/12 majority
    assert 2.2 < last_valid["unigram_ce"] < 2.7 and last_valid["majority_accuracy"] < 0.2
    assert last_valid["loss"] < last_valid["unigram_ce"] - 0.5
    assert last_valid["accuracy"] > last_valid["majority_accuracy"] + 0.2


def test_a_bert_that_does_not_learn_is_warned_about(units: Path, tmp_path: Path, caplog) -> None:
    import logging

    cfg = load_config(
        _config(tmp_path, max_steps=40), [f"data.train={units}", "optim.lr=1e-9"], UnitBertRunConfig
    )
    with caplog.at_level(logging.WARNING):
        pretrain_unit_bert(cfg, tmp_path / "exp")
    warned = [r.getMessage() for r in caplog.records if "mlm_not_below_unigram" in r.getMessage()]
    assert warned and "not below the unigram cross-entropy" in warned[0]
