"""Plot the curves of a pretraining or CTC fine-tuning run to PNG.

Usage:
    speechvq plot exp/tiny                  # writes exp/tiny/curves.png
    speechvq plot exp/tiny --out curves.png

For pretraining, draws loss (train and valid), contrastive accuracy, code and prob perplexity and
the Gumbel temperature from ``metrics.jsonl``, and a codebook-usage histogram from
``codebook_usage.json``. For CTC fine-tuning (validation records with a WER / CER), draws the CTC
loss (train and valid), the loss per output token, the validation error rates, the gradient norm
with the lr, and the throughput.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from speechvq.errors import UserInputError
from speechvq.files import check_output_file, path_problem, read_text, writing

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("exp_dir", help="experiment directory of `speechvq pretrain`")
    parser.add_argument("--out", default=None, help="PNG to write (default: EXP_DIR/curves.png)")


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r["split"] == split and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _num_negatives(exp_dir: Path) -> int | None:
    """K of the run's config (for the chance lines), or None where it cannot be read."""
    path = exp_dir / "config.yaml"
    if path_problem(path) is not None:
        return None
    try:
        model = (yaml.safe_load(read_text(path, "run config")) or {}).get("model") or {}
        return int(model["config"]["loss"]["num_negatives"])
    except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError, UserInputError):
        return None


def _usage(exp_dir: Path) -> dict[str, Any] | None:
    """``codebook_usage.json`` ({step, counts: [[...] per group]}), or None (with a warning if damaged)."""
    path = exp_dir / "codebook_usage.json"
    if path_problem(path) is not None:
        return None
    try:
        usage = yaml.safe_load(read_text(path, "codebook usage"))
        counts = usage["counts"]
        if not all(isinstance(c, (int, float)) for group in counts for c in group):
            raise TypeError("counts must be lists of numbers")
        return {"step": usage.get("step"), "counts": counts}
    except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError, UserInputError) as err:
        logger.warning("%s: not a codebook-usage record (%s); the histogram is left out", path, err)
        return None


PRETRAIN_PANELS = [
    ("loss (bits per target)", [("train", "loss_bits"), ("valid", "loss_bits")]),
    ("contrastive accuracy", [("train", "accuracy"), ("valid", "accuracy")]),
    ("perplexity (codes)", [("train", "code_perplexity"), ("train", "prob_perplexity")]),
    ("Gumbel temperature", [("train", "temperature")]),
    ("gradient norm / lr", [("train", "grad_norm")]),
]
CTC_PANELS = [
    ("CTC loss (per utterance)", [("train", "loss"), ("valid", "loss")]),
    ("CTC loss per output token (nats)", [("train", "loss_per_token")]),
    ("validation error rate", [("valid", "cer"), ("valid", "wer")]),
    ("throughput (audio s/s)", [("train", "audio_s_per_s")]),
    ("gradient norm / lr", [("train", "grad_norm")]),
]


def panels_for(records: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels of a run: CTC fine-tuning if a record has a WER, CER or loss per output token
    (also before its first validation), else pretraining."""
    ctc = any("cer" in r or "wer" in r or "loss_per_token" in r for r in records)
    return CTC_PANELS if ctc else PRETRAIN_PANELS


def plot_experiment(exp_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves and the codebook-usage histogram of ``exp_dir``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechvq.train.metrics import read_metrics

    exp_dir = Path(exp_dir)
    if not (exp_dir / "metrics.jsonl").exists():
        raise UserInputError(f"{exp_dir}/metrics.jsonl: not found (is this a `speechvq pretrain` directory?)")
    records = read_metrics(exp_dir)
    out = check_output_file(out if out is not None else exp_dir / "curves.png", "--out")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = panels_for(records)
    for ax, (title, series) in zip(axes.flat, panels):
        for split, key in series:
            x, y = _series(records, split, key)
            if x:
                ax.plot(x, y, marker="." if len(x) < 30 else None, label=f"{split} {key}")
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    negatives = _num_negatives(exp_dir) if panels is PRETRAIN_PANELS else None
    if negatives is not None:  # chance: uniform over the target and K distractors
        axes[0, 0].axhline(math.log2(negatives + 1), color="tab:red", linestyle=":", label="chance log2(K+1)")
        axes[0, 1].axhline(1 / (negatives + 1), color="tab:red", linestyle=":", label="chance 1/(K+1)")
        axes[0, 0].legend(fontsize=8)
        axes[0, 1].legend(fontsize=8)
    if panels is PRETRAIN_PANELS:
        axes[1, 0].ticklabel_format(axis="y", useOffset=False)
    x, y = _series(records, "train", "lr")
    if x:
        twin = axes[1, 1].twinx()
        twin.plot(x, y, color="tab:gray", linestyle="--", label="lr")
        twin.set_ylabel("lr")
    ax = axes[1, 2]
    usage = _usage(exp_dir)
    if usage is not None:
        for g, counts in enumerate(usage["counts"]):
            total = max(sum(counts), 1)
            ax.bar(range(len(counts)), [c / total for c in counts], alpha=0.6, label=f"group {g}")
        ax.set_title(f"codebook usage (last log interval, step {usage['step']})")
        ax.set_xlabel("codebook entry")
        ax.set_ylabel("fraction of frames")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.suptitle(str(exp_dir))
    fig.tight_layout()
    with writing(out):
        fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    path = plot_experiment(args.exp_dir, args.out)
    logger.info("wrote %s", path)
    return 0
