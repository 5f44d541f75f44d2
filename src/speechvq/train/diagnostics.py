"""Collapse checks: a pure function over the most recent metric records.

The failure modes are the ones users report most for wav2vec 2.0 pretraining (fairseq#3661,
#3687, #3718, transformers#14387): the contrastive loss stuck at chance, log(K + 1); the quantizer
using only a handful of codes, or on its way there (the argmax codes concentrating while the softmax
stays spread, which the diversity loss does not see); a trivial task (accuracy ~1 with loss ~0, e.g.
every target equal to its distractors); and vanishing gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from speechvq.train.config import DiagnosticsSection


@dataclass(frozen=True)
class CollapseWarning:
    """One diagnosis: a short ``code`` (for tests and grep) and a message for the user."""

    code: str
    message: str


def collapse_warnings(
    records: Sequence[Mapping[str, float]],
    *,
    num_negatives: int,
    num_codebooks: int,
    cfg: DiagnosticsSection,
    chance_after_steps: int | None = None,
    chance: tuple[float, str] | None = None,
) -> list[CollapseWarning]:
    """Diagnose the latest ``cfg.window`` training records.

    Each record holds at least ``step``, ``contrastive`` (loss per target, nats), ``accuracy``,
    ``code_perplexity`` and ``grad_norm`` (``prob_perplexity`` where present). A condition must
    hold in every one of the last ``cfg.window`` records to be reported; the falling-perplexity
    check compares them with the peak over all ``records``.

    Args:
        records: metric records in step order (older ones are ignored).
        num_negatives: K, distractors per target (chance loss is log(K + 1)).
        num_codebooks: G, codebook groups (the minimum code perplexity is G).
        cfg: thresholds.
        chance_after_steps: grace period of the stuck-at-chance check when
            ``cfg.chance_after_steps`` is None (the caller derives it from the warmup; 500 if None).
        chance: (loss per target at chance, what it is) for a loss other than the contrastive
            InfoNCE, whose chance is log(K + 1) (e.g. vq-wav2vec's binary cross-entropy).

    Returns:
        The warnings, empty for a healthy run.
    """
    history = list(records)
    recent = history[-cfg.window :]
    if len(recent) < cfg.window or not recent:
        return []
    grace = cfg.chance_after_steps
    if grace is None:
        grace = chance_after_steps if chance_after_steps is not None else 500
    level = chance if chance is not None else (math.log(num_negatives + 1), "log(K+1)")
    found = _loss_at_chance(recent, level, grace, cfg)
    found += _codebook_warnings(history, recent, num_codebooks, cfg)
    found += _trivial_task(recent, cfg)
    found += _vanishing_gradient(recent, cfg)
    return found


def _always(recent: Sequence[Mapping[str, float]], key: str, test: Callable[[float], bool]) -> bool:
    """Whether ``key`` is present, finite and passes ``test`` in every one of ``recent``."""
    values = [r.get(key) for r in recent]
    return all(v is not None and math.isfinite(float(v)) and test(float(v)) for v in values)


def _loss_at_chance(
    recent: Sequence[Mapping[str, float]], chance: tuple[float, str], grace: int, cfg: DiagnosticsSection
) -> list[CollapseWarning]:
    level, text = chance
    if float(recent[0].get("step", 0)) < grace or not _always(
        recent, "contrastive", lambda v: abs(v - level) <= cfg.chance_rel_tol * level
    ):
        return []
    last = recent[-1]
    return [
        CollapseWarning(
            "loss_at_chance",
            f"contrastive loss {last['contrastive']:.3f} nats ({last['contrastive'] / math.log(2):.3f} bits) "
            f"has stayed at chance, {text} = {level:.3f}, since step {int(recent[0]['step'])}: the model "
            "is not learning (try a lower lr, a longer warmup, or check the audio and masking).",
        )
    ]


def _codebook_warnings(
    history: Sequence[Mapping[str, float]],
    recent: Sequence[Mapping[str, float]],
    num_codebooks: int,
    cfg: DiagnosticsSection,
) -> list[CollapseWarning]:
    """A collapsed codebook; else codes diverging from the soft distributions, or a falling perplexity."""
    last = recent[-1]
    floor = cfg.min_code_perplexity_per_group * num_codebooks
    if _always(recent, "code_perplexity", lambda v: v < floor):
        return [
            CollapseWarning(
                "codebook_collapse",
                f"code perplexity {last['code_perplexity']:.2f} is below {floor:g} ({num_codebooks} groups): "
                "the quantizer uses only a handful of codes (raise the diversity weight or the Gumbel "
                "temperature, or check that the input is not silent).",
            )
        ]
    found = []
    diverging = [r for r in recent if r.get("prob_perplexity") and math.isfinite(float(r["prob_perplexity"]))]
    if len(diverging) == len(recent) and all(
        float(r["code_perplexity"]) < cfg.hard_soft_ratio * float(r["prob_perplexity"]) for r in recent
    ):
        found.append(
            CollapseWarning(
                "codes_diverge_from_probs",
                f"code perplexity {last['code_perplexity']:.1f} is below {cfg.hard_soft_ratio:g} x the prob "
                f"perplexity {float(last['prob_perplexity']):.1f}: the chosen codes concentrate on a few "
                "entries while each frame's softmax flattens, which keeps the diversity loss low without "
                "using the codebook; the targets are losing information (lower the lr, or check the "
                "curves with `speechvq plot`).",
            )
        )
    peak_values = [
        float(r["code_perplexity"])
        for r in history
        if r.get("code_perplexity") is not None and math.isfinite(float(r["code_perplexity"]))
    ]
    peak = max(peak_values) if peak_values else 0.0
    if peak > floor and _always(recent, "code_perplexity", lambda v: v < cfg.falling_fraction * peak):
        found.append(
            CollapseWarning(
                "code_perplexity_falling",
                f"code perplexity {last['code_perplexity']:.1f} has fallen below {cfg.falling_fraction:g} x "
                f"its peak of {peak:.1f}: the quantizer is heading for a handful of codes.",
            )
        )
    return found


def _trivial_task(recent: Sequence[Mapping[str, float]], cfg: DiagnosticsSection) -> list[CollapseWarning]:
    if not (
        _always(recent, "accuracy", lambda v: v >= cfg.trivial_accuracy)
        and _always(recent, "contrastive", lambda v: v <= cfg.trivial_loss)
    ):
        return []
    last = recent[-1]
    return [
        CollapseWarning(
            "trivial_task",
            f"accuracy {last['accuracy']:.3f} with loss {last['contrastive']:.4f}: the contrastive task is "
            "trivial, usually because targets equal their distractors (a collapsed codebook) or the "
            "mask leaks the target.",
        )
    ]


def _vanishing_gradient(
    recent: Sequence[Mapping[str, float]], cfg: DiagnosticsSection
) -> list[CollapseWarning]:
    if not _always(recent, "grad_norm", lambda v: v < cfg.min_grad_norm):
        return []
    return [
        CollapseWarning(
            "vanishing_gradient",
            f"gradient norm {recent[-1]['grad_norm']:.2e} has stayed below {cfg.min_grad_norm:g}: the model "
            "has stopped learning.",
        )
    ]
