"""Pretraining with on-the-fly augmentation: wired in, and a resumed run stays exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from speechvq.cli import main
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import PretrainConfig
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.pretrain import pretrain

CONF = Path(__file__).resolve().parents[2] / "conf"


def _noise_dir(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    sf.write(root / "white.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    return root


def _losses(exp_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(exp_dir) if r["split"] == "train"}


def _weights(exp_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(exp_dir / "checkpoints") / "model.safetensors"))


def test_pretrain_with_augmentation_resumes_exactly(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    augment = {"speed_prob": 0.5, "gain_prob": 1.0, "reverb_prob": 0.5, "noise_prob": 0.5,
               "noise_dir": str(_noise_dir(tmp_path / "noise"))}  # fmt: skip
    # ~4 utterances per update over 16: the run crosses an epoch boundary, the stop is mid-epoch
    cfg = tiny_cfg(corpus, data={"augment": augment}, train={"max_steps": 6})
    plain = pretrain(tiny_cfg(corpus, train={"max_steps": 1}), tmp_path / "plain")
    straight = pretrain(cfg, tmp_path / "straight")
    assert pretrain(cfg, tmp_path / "resumed", stop_at_step=3).stopped_early
    resumed = pretrain(cfg, tmp_path / "resumed")
    assert plain.step == 1 and straight.step == resumed.step == 6

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert a == b
    assert a[1] != _losses(tmp_path / "plain")[1]  # the augmentation reached the model
    wa, wb = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pretrain_cli_takes_augment_overrides(corpus: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    args = ["pretrain", "--config", str(CONF / "pretrain_tiny.yaml"), "--exp-dir", str(exp), "--set",
            f"data.train={corpus}", "train.progress_bar=false", "data.max_tokens=64000", "train.max_steps=2",
            "data.augment.gain_prob=1.0", "data.augment.speed_prob=1.0", "data.augment.speed_factors=[0.9,1.1]"]  # fmt: skip
    assert main(args) == 0
    saved = yaml.safe_load((exp / "config.yaml").read_text())["data"]["augment"]
    assert saved["gain_prob"] == 1.0 and saved["speed_factors"] == [0.9, 1.1]
    assert ckpt.latest_checkpoint(exp / "checkpoints").name == "step_00000002"
    assert main([*args[:-1], "data.augment.noise_prob=0.5"]) == 2  # no noise_dir: a clear error
