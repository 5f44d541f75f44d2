"""wav2vec 2.0 pretraining.

Usage:
    speechvq pretrain --config conf/pretrain_tiny.yaml --exp-dir exp/tiny --set data.train=data/train.tsv
    accelerate launch --num_processes 2 -m speechvq pretrain --config conf/pretrain_base.yaml --exp-dir exp/base

Re-running the same command resumes from the newest checkpoint in ``EXP_DIR/checkpoints``;
``--resume`` additionally insists that there is one.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see conf/pretrain_*.yaml)")
    parser.add_argument("--exp-dir", required=True, help="experiment directory (checkpoints, metrics, logs)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="type-checked config override, e.g. optim.lr=5e-4 train.max_steps=100 model.context.dropout_p=0",
    )
    parser.add_argument(
        "--resume", action="store_true", help="fail unless a checkpoint exists to resume from"
    )


def run(args: argparse.Namespace) -> int:
    from speechvq.train import NonFiniteError, load_config, pretrain

    cfg = load_config(args.config, args.overrides)
    try:
        summary = pretrain(cfg, args.exp_dir, require_resume=args.resume)
    except NonFiniteError as err:
        print(f"speechvq pretrain: stopped: {err}", file=sys.stderr)
        return 1
    rec = summary.last_train
    if rec and summary.main_process:
        logger.info(
            "done at step %d: loss %.4f nats (%.3f bits), accuracy %.3f, code perplexity %.1f",
            summary.step, rec["loss"], rec["loss_bits"], rec["accuracy"], rec["code_perplexity"],
        )  # fmt: skip
    if summary.warnings and summary.main_process:
        logger.warning("collapse warnings during the run: %s", ", ".join(summary.warnings))
    return 0
