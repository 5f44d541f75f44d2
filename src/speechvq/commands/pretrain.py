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

from speechvq.commands._run_args import add_run_arguments, run_training

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(
        parser,
        configs="conf/pretrain_*.yaml",
        example="optim.lr=5e-4 train.max_steps=100 model.context.dropout_p=0",
    )


def run(args: argparse.Namespace) -> int:
    from speechvq.train import load_config, pretrain

    cfg = load_config(args.config, args.overrides)
    summary = run_training("pretrain", lambda: pretrain(cfg, args.exp_dir, require_resume=args.resume))
    if summary is None:
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
