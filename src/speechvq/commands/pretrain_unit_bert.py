"""Masked-LM pretraining of a BERT over discrete units (vq-wav2vec's recipe).

Usage:
    speechvq pretrain-unit-bert --config conf/unit_bert_tiny.yaml --units exp/units/train \
        --valid-units exp/units/valid --exp-dir exp/unit_bert --set train.max_steps=1000

The dictionary (``dict.txt``, and ``bpe.model`` with ``model.bpe_vocab_size``) is built from the
training units into EXP_DIR. Re-running the same command resumes from the newest checkpoint; at the
end the best model (lowest validation loss; the last one without validation) is written to
``EXP_DIR/best_model`` as a transformers masked LM with its dictionary.
"""

from __future__ import annotations

import argparse
import logging

from speechvq.commands._run_args import add_run_arguments, run_training

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(
        parser,
        configs="conf/unit_bert_*.yaml",
        example="optim.lr=5e-4 train.max_steps=100 model.mask_span=5",
    )
    parser.add_argument("--units", help="training units directory (overrides data.train)")
    parser.add_argument("--valid-units", help="validation units directory (overrides data.valid)")


def run(args: argparse.Namespace) -> int:
    from speechvq.errors import UserInputError
    from speechvq.train.config import load_config
    from speechvq.train.tasks.unit_bert import UnitBertRunConfig, pretrain_unit_bert

    overrides = list(args.overrides)
    if args.units:
        overrides.append(f"data.train={args.units}")
    if args.valid_units:
        overrides.append(f"data.valid={args.valid_units}")
    try:
        cfg = load_config(args.config, overrides, UnitBertRunConfig)
    except (TypeError, ValueError) as err:  # UnitBertConfig's own checks
        if isinstance(err, UserInputError):
            raise
        raise UserInputError(f"{args.config}: invalid unit BERT config: {err}") from None
    summary = run_training(
        "pretrain-unit-bert", lambda: pretrain_unit_bert(cfg, args.exp_dir, require_resume=args.resume)
    )
    if summary is None:
        return 1
    rec = summary.last_train
    if rec and summary.main_process:
        logger.info(
            "done at step %d: MLM loss %.4f (unigram cross-entropy %.4f), accuracy %.3f (majority unit %.3f)",
            summary.step, rec["loss"], rec.get("unigram_ce", float("nan")), rec["accuracy"],
            rec.get("majority_accuracy", float("nan")),
        )  # fmt: skip
        valid = summary.last_valid
        if valid:
            logger.info(
                "validation: MLM loss %.4f (unigram %.4f), accuracy %.3f (majority %.3f)",
                valid["loss"], valid.get("unigram_ce", float("nan")), valid["accuracy"],
                valid.get("majority_accuracy", float("nan")),
            )  # fmt: skip
    return 0
