"""The ``speechvq`` command line.

Usage:
    speechvq <command> [options]        (also: python -m speechvq <command>)
    speechvq <command> --help

Each command lives in ``speechvq.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from typing import NoReturn

from speechvq import progress
from speechvq.errors import UserInputError
from speechvq.files import is_disk_full, write_failure
from speechvq.signals import StoppedBySignal

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "convert": (
        "speechvq.commands.convert",
        "convert checkpoints between speechvq, transformers and fairseq",
    ),
    "manifest": ("speechvq.commands.manifest", "scan an audio tree into a fairseq-style manifest"),
    "import": (
        "speechvq.commands.import_corpus",
        "Kaldi / lhotse / LJSpeech / SpeechBrain / Common Voice corpus -> manifests + labels",
    ),
    "prepare-librispeech": (
        "speechvq.commands.prepare_librispeech",
        "LibriSpeech layout -> manifests + labels",
    ),
    "download-librispeech": ("speechvq.commands.download_librispeech", "download and verify LibriSpeech"),
    "validate": ("speechvq.commands.validate", "list every problem in a manifest or dataset"),
    "synth-corpus": (
        "speechvq.commands.synth_corpus",
        "synthesize the embedded speech corpus with espeak-ng",
    ),
    "pretrain": ("speechvq.commands.pretrain", "wav2vec 2.0 / vq-wav2vec pretraining"),
    "finetune-ctc": ("speechvq.commands.finetune_ctc", "CTC fine-tuning of a pretrained wav2vec 2.0 model"),
    "pretrain-unit-bert": ("speechvq.commands.pretrain_unit_bert", "masked-LM BERT pretraining over units"),
    "plot": ("speechvq.commands.plot", "plot the curves of an experiment directory"),
    "export-units": ("speechvq.commands.export_units", "frame-level discrete units of a manifest"),
    "extract-features": (
        "speechvq.commands.extract_features",
        "continuous features of chosen layers (npy or safetensors), long audio in windows",
    ),
    "fit-kmeans": ("speechvq.commands.fit_kmeans", "k-means over one layer's features of a model"),
    "unit-quality": ("speechvq.commands.unit_quality", "phone purity, cluster purity and PNMI of units"),
    "train-lm": ("speechvq.commands.train_lm", "train an n-gram language model (ARPA) on text"),
    "transcribe": (
        "speechvq.commands.transcribe",
        "transcribe audio with a CTC model; WER/CER with references",
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``speechvq <command>: error: ...``), exit code 2,
    like every other bad input; the usage is left to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = OneLineParser(prog="speechvq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--progress",
        default=None,
        choices=["auto", "always", "never"],
        help="progress bars of the commands that walk a corpus: auto (where stderr is a terminal; "
        "the default, or SPEECHVQ_PROGRESS), always or never",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    parsers = {}
    for name, (_, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text)
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    # Only the chosen command's module is imported (and asked for its arguments).
    # (the first known command name: a top-level option's value, e.g. "--log-level ERROR", is none)
    command = next((a for a in argv if a in COMMANDS), None)
    if command in COMMANDS:
        module = importlib.import_module(COMMANDS[command][0])
        module.add_arguments(parsers[command])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2, after its one line)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with progress.mode_set_to(args.progress):
            return int(module.run(args) or 0)
    except UserInputError as err:
        print(f"speechvq {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:
        # the last net for a full disk that a writer did not name itself (its path, where known)
        if not is_disk_full(err):
            raise
        path = getattr(err, "filename", None) or "(the file being written)"
        print(f"speechvq {args.command}: error: {write_failure(err, path)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"speechvq {args.command}: interrupted", file=sys.stderr)
        return 130
    except StoppedBySignal as err:
        print(f"speechvq {args.command}: {err}; resume with: speechvq {shlex.join(argv)}", file=sys.stderr)
        return err.exit_code


def _one_line(message: str) -> str:
    """A message on one line (a reason quoted from a library may hold newlines)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
