from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechvq.cli import main
from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import PretrainConfig
from speechvq.train.loop import NonFiniteError
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.pretrain import pretrain

TIMING_KEYS = {"audio_s_per_s"}


def _train_records(exp_dir: Path) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(exp_dir)
        if r["split"] == "train"
    }


def _final_weights(exp_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(exp_dir / "checkpoints") / "model.safetensors"))


def test_pretrain_resumes_exactly_after_an_interruption(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    # 8 updates of ~4 utterances over 16 utterances: the run crosses an epoch boundary, and the
    # interruption at step 3 falls mid-epoch. Accumulation 2 and dropout exercise every RNG.
    cfg = tiny_cfg(
        corpus,
        model={"preset": "tiny", "overrides": {"context.dropout_p": 0.1}},
        train={"max_steps": 8, "grad_accum": 2},
    )
    straight = pretrain(cfg, tmp_path / "straight")
    first = pretrain(cfg, tmp_path / "resumed", stop_at_step=3)
    assert first.step == 3 and first.stopped_early
    second = pretrain(cfg, tmp_path / "resumed")
    assert second.step == straight.step == 8

    a, b = _train_records(tmp_path / "straight"), _train_records(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(4, 9):
        assert a[step] == b[step], f"step {step} differs"
    wa, wb = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert int(wa["quantizer.num_updates"]) == 7  # temperature of the last update's forward


def test_pretrain_refuses_to_resume_with_a_different_model(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    cfg = tiny_cfg(corpus, train={"max_steps": 1})
    pretrain(cfg, tmp_path / "exp")
    other = tiny_cfg(corpus, model={"preset": "tiny", "overrides": {"final_dim": 8}}, train={"max_steps": 2})
    with pytest.raises(ValueError, match="model config differs"):
        pretrain(other, tmp_path / "exp")


def _poison(model: torch.nn.Module, calls: set[int] | None) -> None:
    """Make the feature encoder return NaN on the given forward calls (all calls if None)."""
    encoder = model.feature_encoder
    original = encoder.forward
    count = {"n": 0}

    def forward(x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        feats, out_lengths = original(x, lengths)
        count["n"] += 1
        if calls is None or count["n"] in calls:
            feats = feats * float("nan")
        return feats, out_lengths

    encoder.forward = forward


def test_pretrain_skips_and_counts_non_finite_steps_and_continues(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    cfg = tiny_cfg(corpus, train={"max_steps": 5})
    model = build_wav2vec2(cfg.model_config())
    _poison(model, {2, 3})
    summary = pretrain(cfg, tmp_path / "exp", model=model)
    assert summary.step == 5 and summary.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = _train_records(tmp_path / "exp")
    assert records[5]["skipped_steps"] == 2
    assert all(r["loss"] is not None for r in records.values())


def test_pretrain_stops_with_a_clear_message_after_many_non_finite_steps(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    cfg = tiny_cfg(corpus, train={"max_steps": 50, "max_nonfinite": 3})
    model = build_wav2vec2(cfg.model_config())
    _poison(model, None)
    with pytest.raises(NonFiniteError, match="3 updates in a row had a non-finite loss or gradient"):
        pretrain(cfg, tmp_path / "exp", model=model)


def test_pretrain_tiny_lowers_the_loss_in_30_steps(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    cfg = tiny_cfg(corpus, train={"max_steps": 30, "log_interval": 5}, schedule={"warmup_steps": 5})
    summary = pretrain(cfg, tmp_path / "exp")
    records = _train_records(tmp_path / "exp")
    assert records[30]["loss"] < 0.9 * records[5]["loss"]
    assert summary.warnings == []


def test_pretrain_cli_writes_config_metrics_checkpoint_and_plot(corpus: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    conf = Path(__file__).resolve().parents[2] / "conf" / "pretrain_tiny.yaml"
    args = ["pretrain", "--config", str(conf), "--exp-dir", str(exp), "--set", f"data.train={corpus}"]
    args += ["train.log_interval=2", "train.progress_bar=false", "data.max_tokens=64000"]
    assert main([*args, "train.max_steps=4"]) == 0
    assert (exp / "config.yaml").is_file()
    assert ckpt.latest_checkpoint(exp / "checkpoints").name == "step_00000004"
    assert any((exp / "tensorboard").iterdir())
    lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert {"loss", "loss_bits", "accuracy", "code_perplexity", "prob_perplexity", "temperature", "grad_norm",
            "lr", "masked_fraction", "audio_s_per_s"} <= set(lines[0])  # fmt: skip
    # re-running the same command resumes (nothing left to do) and --resume insists on a checkpoint
    assert main([*args, "train.max_steps=6", "--resume"]) == 0
    assert ckpt.latest_checkpoint(exp / "checkpoints").name == "step_00000006"
    assert main(["pretrain", "--config", str(conf), "--exp-dir", str(tmp_path / "new"), "--resume",
                 "--set", f"data.train={corpus}"]) == 2  # fmt: skip
    assert main(["plot", str(exp)]) == 0
    assert (exp / "curves.png").stat().st_size > 10_000
    from speechvq.commands.plot import PRETRAIN_PANELS, panels_for

    assert panels_for(lines) is PRETRAIN_PANELS


def test_pretrain_runs_in_bf16_autocast_on_the_cpu(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    summary = pretrain(tiny_cfg(corpus, train={"max_steps": 2, "precision": "bf16"}), tmp_path / "exp")
    assert summary.step == 2 and summary.skipped_steps == 0
    weights = _final_weights(tmp_path / "exp")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())


def test_pretrain_rejects_fp16_on_the_cpu(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    with pytest.raises(ValueError, match=r"`train\.precision` must be fp32 or bf16 on the CPU"):
        pretrain(tiny_cfg(corpus, train={"precision": "fp16", "cpu": True}), tmp_path / "exp")


def test_pretrain_validates_and_keeps_the_last_and_the_best_checkpoint(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    cfg = tiny_cfg(
        corpus, data={"valid": str(corpus)}, train={"max_steps": 4, "valid_interval": 1, "keep_last": 1}
    )
    summary = pretrain(cfg, tmp_path / "exp")
    valid = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "exp") if r["split"] == "valid"}
    assert sorted(valid) == [1, 2, 3, 4] and summary.last_valid is not None
    best_step = min(valid, key=valid.get)
    assert ckpt.read_best(tmp_path / "exp" / "checkpoints")["step"] == best_step
    kept = {p.name for p in ckpt.list_checkpoints(tmp_path / "exp" / "checkpoints")}
    assert kept == {f"step_{best_step:08d}", "step_00000004"}


def test_pretrain_runs_with_the_kmeans_quantizer_in_bf16(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    # codebook usage is counted over the active quantizer's (G, V), not the Gumbel config's
    overrides = {"quantizer_type": "kmeans", "kmeans.codebook_size": 24, "kmeans.codevector_dim": 16}
    cfg = tiny_cfg(
        corpus, model={"preset": "tiny", "overrides": overrides}, train={"max_steps": 2, "precision": "bf16"}
    )
    summary = pretrain(cfg, tmp_path / "exp")
    assert summary.step == 2 and summary.skipped_steps == 0
    usage = json.loads((tmp_path / "exp" / "codebook_usage.json").read_text())
    assert len(usage["counts"]) == 2 and all(len(row) == 24 for row in usage["counts"])
