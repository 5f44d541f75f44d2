from __future__ import annotations

import itertools
import math

import pytest
import torch

from speechvq.train.optim import build_optimizer, lr_at
from speechvq.train.sections import OptimSection, ScheduleSection


def test_polynomial_schedule_warms_up_linearly_then_decays_to_end() -> None:
    cfg = ScheduleSection(name="polynomial", warmup_steps=10, end_lr_scale=0.0, power=1.0)
    lrs = [lr_at(s, 1.0, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert lr_at(110, 1.0, 110, cfg) == pytest.approx(0.0)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))


def test_tri_stage_schedule_matches_fairseq_phases() -> None:
    cfg = ScheduleSection(
        name="tri_stage", phase_ratio=(0.1, 0.4, 0.5), init_lr_scale=0.01, final_lr_scale=0.05
    )
    assert lr_at(0, 2.0, 100, cfg) == pytest.approx(0.02)
    assert lr_at(10, 2.0, 100, cfg) == pytest.approx(2.0)
    assert lr_at(49, 2.0, 100, cfg) == pytest.approx(2.0)
    assert lr_at(75, 2.0, 100, cfg) == pytest.approx(2.0 * math.sqrt(0.05))  # exponential decay, half way
    assert lr_at(100, 2.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(500, 2.0, 100, cfg) == pytest.approx(0.1)


def test_cosine_schedule_reaches_half_peak_at_mid_decay() -> None:
    cfg = ScheduleSection(name="cosine", warmup_steps=0, end_lr_scale=0.0)
    assert lr_at(0, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100, cfg) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_build_optimizer_uses_wav2vec2_adam_settings() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimSection())
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6 and group["weight_decay"] == 0.01


def test_optimizer_is_fused_adamw_with_the_foreach_updates() -> None:
    # the fused kernel is a speed choice only: five updates equal torch's default AdamW's
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    reference.load_state_dict(model.state_dict())
    cfg = OptimSection(lr=1e-2, weight_decay=0.01)
    optim = build_optimizer(model, cfg)
    assert isinstance(optim, torch.optim.AdamW) and optim.defaults["fused"]
    ref_optim = torch.optim.AdamW(
        reference.parameters(), lr=1e-2, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.01
    )
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((model, optim), (reference, ref_optim)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
