from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.train.config import DiagnosticsSection, PretrainConfig
from speechvq.train.diagnostics import collapse_warnings
from speechvq.train.tasks.pretrain import pretrain

HEALTHY = {
    "contrastive": 2.0,
    "accuracy": 0.4,
    "code_perplexity": 200.0,
    "prob_perplexity": 240.0,
    "grad_norm": 0.8,
}


def _codes(records: list[dict[str, float]], **kwargs: float) -> list[str]:
    cfg = DiagnosticsSection(window=3, chance_after_steps=100, **kwargs)
    return [w.code for w in collapse_warnings(records, num_negatives=100, num_codebooks=2, cfg=cfg)]


def _run(start: int, **values: float) -> list[dict[str, float]]:
    return [{"step": start + 10 * i, **HEALTHY, **values} for i in range(3)]


def test_collapse_warnings_are_silent_on_healthy_records() -> None:
    assert _codes(_run(1000)) == []


def test_collapse_warnings_flag_loss_stuck_at_chance_only_after_the_grace_period() -> None:
    chance = math.log(101)
    assert _codes(_run(1000, contrastive=chance * 1.001)) == ["loss_at_chance"]
    assert _codes(_run(10, contrastive=chance)) == []


def test_collapse_warnings_flag_codebook_collapse_trivial_task_and_vanishing_gradient() -> None:
    assert _codes(_run(1000, code_perplexity=2.3)) == ["codebook_collapse"]
    assert _codes(_run(1000, accuracy=1.0, contrastive=0.001)) == ["trivial_task"]
    assert _codes(_run(1000, grad_norm=1e-9)) == ["vanishing_gradient"]


def test_collapse_warnings_flag_codes_diverging_from_probs_and_falling_code_perplexity() -> None:
    # The measured failure of a bf16 SMALL run: argmax codes 210 -> 24 while the softmax spread rose.
    assert _codes(_run(1000, code_perplexity=24.0, prob_perplexity=279.0)) == ["codes_diverge_from_probs"]
    assert _codes(_run(1000, code_perplexity=100.0, prob_perplexity=279.0)) == []
    falling = _run(900, code_perplexity=210.0) + _run(1000, code_perplexity=40.0, prob_perplexity=60.0)
    assert _codes(falling) == ["code_perplexity_falling"]
    assert (
        _codes(_run(900, code_perplexity=210.0) + _run(1000, code_perplexity=60.0, prob_perplexity=60.0))
        == []
    )


def test_loss_at_chance_grace_period_follows_the_warmup_unless_set() -> None:
    chance = math.log(101)
    records = _run(600, contrastive=chance)
    auto = DiagnosticsSection(window=3)
    found = collapse_warnings(records, num_negatives=100, num_codebooks=2, cfg=auto, chance_after_steps=500)
    assert [w.code for w in found] == ["loss_at_chance"]
    found = collapse_warnings(records, num_negatives=100, num_codebooks=2, cfg=auto, chance_after_steps=2000)
    assert found == []


def test_collapse_warnings_need_the_whole_window() -> None:
    records = _run(1000, code_perplexity=2.3)
    records[0]["code_perplexity"] = 300.0
    assert _codes(records) == []
    assert _codes(records[-2:]) == []


def test_pretrain_warns_on_a_collapsed_quantizer_and_not_on_a_healthy_run(
    corpus: Path, tmp_path: Path, tiny_cfg: Callable[..., PretrainConfig]
) -> None:
    cfg = tiny_cfg(corpus, train={"max_steps": 5})
    healthy = pretrain(cfg, tmp_path / "healthy")
    assert healthy.warnings == []

    torch.manual_seed(0)
    model = build_wav2vec2(cfg.model_config())
    q = model.quantizer
    with torch.no_grad():  # every frame picks entry 0 of each group, whatever the input
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.view(q.num_codebooks, q.codebook_size)[:, 0] = 100.0
    collapsed = pretrain(cfg, tmp_path / "collapsed", model=model)
    assert "codebook_collapse" in collapsed.warnings
    assert "trivial_task" in collapsed.warnings
    assert collapsed.last_train["code_perplexity"] < 2.5


def test_code_persistence_counts_equal_consecutive_codes_over_valid_frames() -> None:
    from types import SimpleNamespace

    from speechvq.train.tasks.pretrain import code_persistence_sums

    codes = torch.tensor(
        [
            [[1, 2], [1, 2], [1, 3], [1, 3], [0, 0]],  # pairs: same, differ, same, (padding)
            [[4, 4], [4, 4], [4, 4], [5, 4], [5, 4]],  # same, same, differ, same
        ]
    )
    out = SimpleNamespace(quantizer=SimpleNamespace(codes=codes), lengths=torch.tensor([4, 5]))
    sums = code_persistence_sums(out)
    assert sums == {"same_code_pairs": 5.0, "frame_pairs": 7.0}
