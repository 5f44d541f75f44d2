"""Optimizer and learning-rate schedules as explicit functions of the update count."""

from __future__ import annotations

import math

import torch
from torch import nn

from speechvq.train.sections import OptimSection, ScheduleSection


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay on every trainable parameter.

    fairseq's ``adam`` applies ``weight_decay`` as ``p -= lr * wd * p`` outside the moment
    estimates, which is AdamW; wav2vec 2.0 uses (0.9, 0.98), eps 1e-6, wd 0.01.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused kernel (CPU and CUDA): one pass over each parameter instead of foreach's
    # several; 3.3x faster on the BASE model's 95M parameters here (180 -> 55 ms per update)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def lr_at(step: int, peak_lr: float, max_steps: int, cfg: ScheduleSection) -> float:
    """Learning rate of update ``step`` (0-based).

    Args:
        step: updates done so far.
        peak_lr: the peak learning rate (``optim.lr``).
        max_steps: total updates of the run (``train.max_steps``).
        cfg: the schedule.

    Returns:
        The learning rate for this update.
    """
    if cfg.name == "tri_stage":
        return _tri_stage(step, peak_lr, max_steps, cfg)
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    end_lr = peak_lr * cfg.end_lr_scale
    progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
    if cfg.name == "polynomial":
        return end_lr + (peak_lr - end_lr) * (1.0 - progress) ** cfg.power
    if cfg.name == "cosine":
        return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "constant":
        return peak_lr
    raise ValueError(
        f"`cfg.name` must be polynomial, tri_stage, cosine or constant, but is {cfg.name!r} instead."
    )


def _tri_stage(step: int, peak_lr: float, max_steps: int, cfg: ScheduleSection) -> float:
    """fairseq ``tri_stage``: linear warmup from ``init_lr_scale``, hold at the peak, then
    exponential decay to ``final_lr_scale`` (and flat after)."""
    warmup = int(cfg.phase_ratio[0] * max_steps)
    hold = int(cfg.phase_ratio[1] * max_steps)
    decay = max_steps - warmup - hold
    init_lr = peak_lr * cfg.init_lr_scale
    if step < warmup:
        return init_lr + (peak_lr - init_lr) * step / warmup
    if step < warmup + hold:
        return peak_lr
    if decay <= 0:
        return peak_lr * cfg.final_lr_scale
    into = min(step - warmup - hold, decay)
    return peak_lr * math.exp(math.log(cfg.final_lr_scale) * into / decay)


def set_lr_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
