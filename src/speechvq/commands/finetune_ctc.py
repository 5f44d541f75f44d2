"""CTC fine-tuning of a pretrained wav2vec 2.0 model (or the same architecture from scratch).

Usage:
    speechvq finetune-ctc --config conf/finetune_10min.yaml --init exp/pretrain_base \
        --train data/train_10min.tsv --valid data/dev_other.tsv --exp-dir exp/ft_10min
    speechvq finetune-ctc --config conf/finetune_small_cpu.yaml --init none ...   # from scratch

``--init`` takes a speechvq model directory, a pretraining experiment or checkpoint directory,
a transformers model directory or a fairseq ``.pt`` checkpoint. Labels are the ``.ltr`` (or
``.wrd``, ``data.labels``) file beside each manifest. Re-running the same command resumes from the
newest checkpoint; at the end the best model (lowest validation WER) is written to
``EXP_DIR/best_model``, ready for ``speechvq transcribe EXP_DIR/best_model MANIFEST``.

BERT features (vq-wav2vec's recipe, :mod:`speechvq.units.ctc`, :mod:`speechvq.train.tasks.unit_ctc`): when ``--init`` is a unit BERT
(a ``pretrain-unit-bert`` ``best_model`` or experiment directory, recognised by its
``unit_bert.json``), the model is units -> BERT layer -> acoustic head -> CTC, and ``--units`` /
``--valid-units`` give the ``export-units`` directories of the ``--train`` / ``--valid``
manifests (same order; the labels still come from the ``.ltr``/``.wrd`` files beside them)::

    speechvq finetune-ctc --config conf/finetune_units_small_cpu.yaml --init exp/unit_bert \
        --train data/train.tsv --units exp/units/train --valid data/valid.tsv \
        --valid-units exp/units/valid --exp-dir exp/ft_units

The front end is recognised from ``--init`` rather than chosen by a separate switch: the
pretrained model fixes what the input is (a unit BERT cannot read waveforms, a wav2vec 2.0 model
cannot read units), so a switch could only repeat ``--init`` or contradict it. ``--units`` without
a unit-BERT ``--init`` (or the reverse) is an error naming the problem.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from speechvq.commands._run_args import add_run_arguments, run_training

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(
        parser,
        configs="conf/finetune_*.yaml",
        example="optim.lr=5e-5 train.max_steps=100 model.freeze_updates=0",
    )
    parser.add_argument(
        "--init",
        required=True,
        help="pretrained model, experiment or checkpoint directory, HF directory or fairseq .pt, "
        "or a unit BERT (pretrain-unit-bert best_model; then give --units); "
        "'none' trains the same architecture (model.preset) from scratch",
    )
    parser.add_argument("--train", help="training manifest (overrides data.train)")
    parser.add_argument("--valid", help="validation manifest (overrides data.valid)")
    parser.add_argument(
        "--units", help="with a unit-BERT --init: units of the training manifest (overrides data.train_units)"
    )
    parser.add_argument(
        "--valid-units", help="with a unit-BERT --init: units of the validation manifest (data.valid_units)"
    )


def run(args: argparse.Namespace) -> int:
    from speechvq.train.config import load_config
    from speechvq.train.finetune import FinetuneConfig, finetune

    overrides = list(args.overrides)
    if args.train:
        overrides.append(f"data.train={args.train}")
    if args.valid:
        overrides.append(f"data.valid={args.valid}")
    init = None if args.init.lower() == "none" else args.init
    if _unit_bert_front_end(init, args):
        return _run_unit_bert(args, overrides)
    cfg = load_config(args.config, overrides, FinetuneConfig)
    summary = run_training(
        "finetune-ctc", lambda: finetune(cfg, init, args.exp_dir, require_resume=args.resume)
    )
    return _report(summary)


def _unit_bert_front_end(init: str | None, args: argparse.Namespace) -> bool:
    """Whether ``--init`` is a unit BERT; ``--units`` with anything else is an error."""
    from speechvq.errors import UserInputError
    from speechvq.units.bert import find_unit_bert

    found = init is not None and find_unit_bert(init) is not None
    if not found and (args.units or args.valid_units):
        raise UserInputError(
            f"{args.init}: --units needs --init to be a unit BERT (a pretrain-unit-bert best_model with "
            "unit_bert.json), but it is not one"
        )
    return found


def _run_unit_bert(args: argparse.Namespace, overrides: list[str]) -> int:
    from speechvq.train.config import load_config
    from speechvq.train.finetune import UnitCtcRunConfig, finetune_unit_bert_ctc

    if args.units:
        overrides.append(f"data.train_units={args.units}")
    if args.valid_units:
        overrides.append(f"data.valid_units={args.valid_units}")
    cfg = load_config(args.config, overrides, UnitCtcRunConfig)
    summary = run_training(
        "finetune-ctc",
        lambda: finetune_unit_bert_ctc(cfg, args.init, args.exp_dir, require_resume=args.resume),
    )
    return _report(summary)


def _report(summary: Any) -> int:
    """Exit code of a run, and its final validation WER/CER on the main process."""
    if summary is None:
        return 1
    if summary.main_process and summary.last_valid:
        v = summary.last_valid
        logger.info("done at step %d: valid WER %.4f, CER %.4f", summary.step, v["wer"], v["cer"])
    return 0
