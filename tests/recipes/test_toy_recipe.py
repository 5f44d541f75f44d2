"""The embedded demo, `recipes/toy/run.sh --quick`, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[2] / "recipes" / "toy" / "run.sh"


def _numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def test_toy_recipe_quick_runs_every_stage_and_writes_finite_results(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    args = [
        "bash",
        str(RECIPE),
        "--quick",
        "--data-dir",
        str(tmp_path / "data"),
        "--exp-dir",
        str(tmp_path / "exp"),
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in range(10):
        assert f"Stage {stage}:" in done.stderr
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert set(results["units"]) == {"codes", "kmeans"}
    assert set(results["vq_units"]) == {"context", "logmel"}  # vq-wav2vec's units and the log-mel baseline
    assert set(results["ctc"]) == {"pretrained", "scratch", "vq_bert", "vq_units"}
    for init in results["ctc"]:  # greedy and word-LM decoding of the test set
        assert set(results["ctc"][init]) == {"wer", "cer", "lm_wer", "lm_cer"}
    assert set(results["gain"]) == set(results["bert_gain"]) == {"wer", "cer", "lm_wer", "lm_cer"}
    scratch, pre = results["ctc"]["scratch"], results["ctc"]["pretrained"]
    assert results["gain"]["lm_cer"] == pytest.approx(100 * (1 - pre["lm_cer"] / scratch["lm_cer"]))
    for pretraining in ("pretrain", "vq_pretrain"):
        assert results[pretraining]["steps"] == 30 and math.isfinite(results[pretraining]["valid_loss"])
        assert (tmp_path / "exp" / pretraining / "curves.png").is_file()
    bert = results["unit_bert"]  # judged against the unigram entropy and the majority unit
    assert bert["valid_loss_below_unigram"] == pytest.approx(bert["valid_unigram_ce"] - bert["valid_loss"])
    assert 0.0 < bert["valid_majority_accuracy"] < 1.0
    numbers = _numbers(results)
    assert len(numbers) >= 30
    assert all(math.isfinite(n) for n in numbers)
    assert 0.0 <= results["units"]["codes"]["pnmi"] <= 1.0
    assert 0.0 <= results["vq_units"]["context"]["pnmi"] <= 1.0
    assert (tmp_path / "exp" / "results.md").read_text().startswith("| stage |")
