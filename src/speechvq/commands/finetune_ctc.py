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
"""

from __future__ import annotations

import argparse
import logging

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
        help="pretrained model, experiment or checkpoint directory, HF directory or fairseq .pt; "
        "'none' trains the same architecture (model.preset) from scratch",
    )
    parser.add_argument("--train", help="training manifest (overrides data.train)")
    parser.add_argument("--valid", help="validation manifest (overrides data.valid)")


def run(args: argparse.Namespace) -> int:
    from speechvq.train.config import load_config
    from speechvq.train.finetune import FinetuneConfig, finetune

    overrides = list(args.overrides)
    if args.train:
        overrides.append(f"data.train={args.train}")
    if args.valid:
        overrides.append(f"data.valid={args.valid}")
    cfg = load_config(args.config, overrides, FinetuneConfig)
    init = None if args.init.lower() == "none" else args.init
    summary = run_training(
        "finetune-ctc", lambda: finetune(cfg, init, args.exp_dir, require_resume=args.resume)
    )
    if summary is None:
        return 1
    if summary.main_process and summary.last_valid:
        v = summary.last_valid
        logger.info("done at step %d: valid WER %.4f, CER %.4f", summary.step, v["wer"], v["cer"])
    return 0
