"""The trainer on a GPU: bf16 and fp16 (with accelerate's loss scaling). Skipped without CUDA.

Every other trainer test also runs on the GPU where there is one (the trainer takes it unless
``train.cpu`` is set); these add the precisions that the CPU cannot run or that matter most there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import PretrainConfig
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.pretrain import pretrain

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_on_the_gpu_in_half_precision_updates_fp32_weights(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig], precision: str
) -> None:
    cfg = tiny_cfg(corpus, train={"max_steps": 8, "precision": precision})
    torch.cuda.reset_peak_memory_stats()
    summary = pretrain(cfg, tmp_path / "exp")
    assert torch.cuda.max_memory_allocated() > 0  # the run was on the GPU
    assert summary.step == 8
    if precision == "bf16":
        assert summary.skipped_steps == 0
    records = [r for r in read_metrics(tmp_path / "exp") if r["split"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in records)
    torch.manual_seed(cfg.train.seed)
    init = build_wav2vec2(cfg.model_config()).state_dict()
    final = load_file(str(ckpt.latest_checkpoint(tmp_path / "exp" / "checkpoints") / "model.safetensors"))
    changed = [k for k, w in final.items() if w.is_floating_point() and not torch.equal(w, init[k])]
    assert all(
        w.dtype == torch.float32 and torch.isfinite(w).all() for w in final.values() if w.is_floating_point()
    )
    # every weight moved, and not far: 8 small steps from the trainer's own initialisation
    assert len(changed) > 0.9 * sum(w.is_floating_point() for w in final.values())
    moved = math.sqrt(sum(float((final[k] - init[k]).norm() ** 2) for k in changed))
    assert moved < 0.2 * math.sqrt(sum(float(init[k].norm() ** 2) for k in changed))
