"""Data parallelism: 2 processes x batch b == 1 process x batch 2b.

Runs ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo). On a machine without a
GPU, accelerate forms a process group only with ``--multi_gpu`` (or a MULTI_CPU config file).

What makes the two runs equal: the sampler deals out update groups (two neighbouring per-rank
batches = one single-process batch), each utterance's mask, distractors and Gumbel noise come from
its own generator, LayerDrop from one generator per update, the diversity loss's perplexity is
taken over the code distribution summed over the processes, and the loss is normalised by the
targets of all processes. Dropout is the one source of randomness drawn per batch, so it is off.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechvq.train import checkpoint as ckpt
from speechvq.train.config import PretrainConfig
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.pretrain import pretrain


def _losses(exp_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(exp_dir) if r["split"] == "train"]


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(
    tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig], corpus_factory: Callable[..., Path]
) -> None:
    # 16 equal-length utterances: 2 per process and update under DDP, 4 per update in one process.
    # LayerDrop 0.5 checks that ranks skip the same blocks under DDP.
    (tmp_path / "audio").mkdir()
    manifest = corpus_factory(tmp_path / "audio", num_files=16, seconds=(1.0, 1.0))
    overrides = {
        "context.dropout_p": 0.0, "context.attention_dropout_p": 0.0, "feature_dropout_p": 0.0,
        "context.layer_drop_p": 0.5,
    }  # fmt: skip
    base = dict(
        model={"preset": "tiny", "overrides": overrides},
        data={"max_sample_size": 16000, "max_tokens": 32000},
        train={"max_steps": 4, "log_interval": 1, "cpu": True},
    )
    single_cfg = tiny_cfg(manifest, **{**base, "data": {**base["data"], "max_tokens": 64000}})
    pretrain(single_cfg, tmp_path / "single")

    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(tiny_cfg(manifest, **base).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    with socket.socket() as sock:  # a free port, so that concurrent test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "speechvq", "pretrain", "--config", str(config_path), "--exp-dir", str(tmp_path / "ddp")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done at step 4" in result.stderr
    assert result.stderr.count("done at step 4") == 1  # only the main process reports
    assert "pretrain: 2 processes on cpu" in result.stderr  # the start-up summary
    assert "accelerate launch asked for" not in result.stderr  # both processes did run

    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 4
    assert ddp == pytest.approx(single, rel=1e-5)
    # the diversity loss used the perplexity of both processes' frames, as one process does
    perplexities = [
        [r["prob_perplexity"] for r in read_metrics(tmp_path / d) if r["split"] == "train"]
        for d in ("single", "ddp")
    ]
    assert perplexities[1] == pytest.approx(perplexities[0], rel=1e-5)
    wa = load_file(str(ckpt.latest_checkpoint(tmp_path / "single" / "checkpoints") / "model.safetensors"))
    wb = load_file(str(ckpt.latest_checkpoint(tmp_path / "ddp" / "checkpoints") / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4, msg=key)
