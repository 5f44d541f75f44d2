"""vq-wav2vec pretraining through ``speechvq pretrain``: configs, the loss against fairseq's,
diagnostics, exact resume after an interruption and after a SIGKILL, with both quantizers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechvq.config import VqWav2VecConfig, vq_wav2vec_gumbel, vq_wav2vec_kmeans
from speechvq.data.collate import AudioBatch
from speechvq.errors import UserInputError
from speechvq.interop.fairseq import import_fairseq
from speechvq.io import load_pretrained
from speechvq.models.vq_wav2vec import VqWav2VecModel
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import config_from_dict, load_config
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.pretrain import pretrain
from speechvq.train.tasks.vq_wav2vec import VqWav2VecPretrainTask, bce_chance, usage_by_group

ROOT = Path(__file__).resolve().parents[2]
FAIRSEQ = ROOT / "tests" / "fixtures" / "fairseq"
TINY = {
    "encoder_layers": [[32, 10, 5], [32, 8, 4], [32, 4, 2], [32, 4, 2], [32, 4, 2], [32, 1, 1]],
    "aggregator_layers": [[32, 2, 1], [32, 3, 1], [32, 4, 1], [32, 5, 1]],
    "quantizer.codevector_dim": 32,
    "quantizer.codebook_size": 16,
    "kmeans.codevector_dim": 32,
    "kmeans.codebook_size": 16,
    "prediction_steps": 4,
    "num_negatives": 5,
    "dropout_p": 0.1,  # every RNG matters for the resume tests
}


def tiny_vq(manifest: Path, quantizer: str, **train: object) -> dict:
    """A tiny vq-wav2vec run config (plain dict) on ``manifest``."""
    return {
        "model": {"type": "vq_wav2vec", "preset": quantizer, "overrides": dict(TINY)},
        "data": {
            "train": str(manifest),
            "max_sample_size": 16000,
            "min_sample_size": 4000,
            "max_tokens": 48000,
        },
        "optim": {"lr": 2e-3},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "train": {
            "max_steps": 6,
            "log_interval": 1,
            "save_interval": 1000,
            "progress_bar": False,
            "tensorboard": False,
            **train,
        },
    }


def _cfg(data: dict):
    cfg = config_from_dict(data)
    cfg.validate()
    return cfg


@pytest.mark.parametrize(("name", "preset"), [("gumbel", vq_wav2vec_gumbel), ("kmeans", vq_wav2vec_kmeans)])
def test_the_paper_configs_load_as_vq_wav2vec(name, preset) -> None:
    cfg = load_config(f"pretrain_vq_wav2vec_{name}", ["data.train=x.tsv"])
    assert cfg.model.type == "vq_wav2vec"
    model_cfg = cfg.model_config()
    assert isinstance(model_cfg, VqWav2VecConfig) and model_cfg == preset()
    assert model_cfg.codebook_shape == (2, 320) and model_cfg.prediction_steps == 12
    assert (cfg.optim.lr, cfg.schedule.name, cfg.schedule.warmup_steps) == (1e-5, "cosine", 1000)
    assert (cfg.data.max_sample_size, cfg.data.max_tokens) == (150000, 300000)


def test_a_wav2vec2_preset_is_refused_for_vq_wav2vec() -> None:
    with pytest.raises(UserInputError, match=r"`model.preset` must be one of \['gumbel', 'kmeans'\]"):
        load_config("pretrain_vq_wav2vec_gumbel", ["data.train=x.tsv", "model.preset=base"])


def test_bce_chance_is_the_loss_of_the_label_rate() -> None:
    # a constant logit c with sigmoid(c) = 1/(K+1) minimises the BCE of 1 positive and K negatives
    k = 10
    c = math.log(1 / k)
    loss = math.log1p(math.exp(-c)) + k * math.log1p(math.exp(c))
    assert bce_chance(k) == pytest.approx(loss) == pytest.approx(3.3510, abs=1e-4)


def test_usage_by_group_reports_perplexity_and_unused_codes() -> None:
    counts = torch.tensor([[5, 5, 0, 0], [1, 1, 1, 1]])
    rec = usage_by_group(counts)
    assert rec["code_perplexity_g0"] == pytest.approx(2.0) and rec["unused_codes_g0"] == 2
    assert rec["code_perplexity_g1"] == pytest.approx(4.0) and rec["unused_codes_g1"] == 0


@pytest.mark.parametrize("name", ["vq_gumbel", "vq_kmeans"])
def test_the_task_loss_on_a_fixed_batch_equals_fairseqs(name: str) -> None:
    # fairseq's model, batch and negatives (tests/fixtures/fairseq): the task's summed loss and its
    # per-target record equal fairseq's wav2vec criterion (BCE sum + w * N * k-means loss, over N)
    model = import_fairseq(FAIRSEQ / f"{name}.pt")
    ref = load_file(str(FAIRSEQ / f"{name}.safetensors"))
    quantizer = "kmeans" if model.cfg.quantizer_type == "kmeans" else "gumbel"
    data = tiny_vq(Path("x.tsv"), quantizer)
    data["model"] = {"type": "vq_wav2vec", "preset": None, "config": model.cfg.to_dict()}
    task = VqWav2VecPretrainTask(_cfg(data), Path("."), model)
    waves = ref["input"]
    batch = AudioBatch(waveforms=waves, lengths=torch.full((waves.size(0),), waves.size(1)),
                       indices=torch.arange(waves.size(0)))  # fmt: skip

    def with_fairseqs_negatives(w, lengths, generator):
        return model(w, lengths, distractor_index=ref["distractors"])

    model.eval()
    with torch.no_grad():
        loss, stats = task.batch_loss(
            with_fairseqs_negatives,
            model,
            batch,
            generator=torch.Generator(),
            update_generator=torch.Generator(),
        )
    n = stats["targets"]
    batch_size, frames, _ = ref["distractors"].shape
    assert n == batch_size * sum(frames - model.offset - s for s in range(model.cfg.prediction_steps))
    want = float(ref["loss"]) + (n * float(ref["kmeans_loss"]) if "kmeans_loss" in ref else 0.0)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    rec = task.record(stats)
    assert rec["loss"] == pytest.approx(want / n, rel=1e-5)
    assert rec["contrastive"] == pytest.approx(float(ref["loss"]) / n, rel=1e-5)


@pytest.mark.parametrize("quantizer", ["gumbel", "kmeans"])
def test_vq_wav2vec_resumes_exactly_after_an_interruption(corpus, tmp_path, quantizer) -> None:
    cfg = _cfg(tiny_vq(corpus, quantizer, max_steps=6, grad_accum=2))
    straight = pretrain(cfg, tmp_path / "straight")
    assert pretrain(cfg, tmp_path / "resumed", stop_at_step=2).step == 2
    assert pretrain(cfg, tmp_path / "resumed").step == straight.step == 6
    records = [
        {r["step"]: {k: v for k, v in r.items() if k != "audio_s_per_s"} for r in read_metrics(tmp_path / d)
         if r["split"] == "train"}
        for d in ("straight", "resumed")
    ]  # fmt: skip
    for step in range(3, 7):
        assert records[0][step] == records[1][step], step
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the diagnostics of both quantizers, and the exported model
    last = records[0][6]
    assert {
        "accuracy",
        "binary_accuracy",
        "code_perplexity_g0",
        "code_perplexity_g1",
        "unused_codes_g0",
    } <= set(last)
    assert ("dead_codes" in last) == (quantizer == "kmeans")
    exported = load_pretrained(tmp_path / "straight" / "best_model")
    assert isinstance(exported, VqWav2VecModel) and exported.cfg.quantizer_type == quantizer
    usage = json.loads((tmp_path / "straight" / "codebook_usage.json").read_text())
    assert usage["step"] == 6 and len(usage["counts"]) == 2


def test_vq_wav2vec_killed_mid_run_resumes_bit_identical(corpus, tmp_path) -> None:
    # a real SIGKILL of `speechvq pretrain` after its third checkpoint, then the same command again
    data = tiny_vq(corpus, "gumbel", max_steps=8, save_interval=1, keep_last=3, cpu=True)
    config = tmp_path / "vq.yaml"
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", SPEECHVQ_CKPT_WRITE_DELAY_S="0.05")
    cmd = [
        sys.executable,
        "-m",
        "speechvq",
        "pretrain",
        "--config",
        str(config),
        "--exp-dir",
        str(tmp_path / "killed"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "checkpoints" / "step_00000003").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr
    pretrain(_cfg({**data, "train": {**data["train"], "save_interval": 1000}}), tmp_path / "straight")
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
