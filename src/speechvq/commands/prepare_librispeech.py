"""``speechvq prepare-librispeech``: LibriSpeech layout -> per-split manifests and labels.

Usage:
    speechvq prepare-librispeech data/LibriSpeech --out data/manifests

For every split found under ROOT (``<split>/<speaker>/<chapter>/*.flac`` + ``*.trans.txt``)
writes ``OUT/<split>.tsv`` (root = the split directory), ``OUT/<split>.wrd``, ``OUT/<split>.ltr``,
and one ``OUT/dict.ltr.txt`` over all written splits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechvq.data.librispeech import find_splits, scan_split, write_letter_dict, write_split
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root", type=Path, help="LibriSpeech directory (holding the split folders) or one split"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory for manifests and labels")
    parser.add_argument("--splits", nargs="*", default=None, help="only these splits (default: all found)")
    parser.add_argument("--ext", default="flac", help="audio file extension (default: flac)")


def run(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise UserInputError(f"{args.root}: is not a directory")
    check_output_dir(args.out, "--out")
    splits = find_splits(args.root)
    if args.splits:
        missing = sorted(set(args.splits) - set(splits))
        if missing:
            raise UserInputError(f"{args.root}: split(s) {missing} not found; found {sorted(splits)}")
        splits = {k: v for k, v in splits.items() if k in args.splits}
    if not splits:
        raise UserInputError(
            f"{args.root}: no LibriSpeech split (<split>/<speaker>/<chapter>/*.trans.txt) found"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    all_words: list[str] = []
    num_problems = 0
    for name, split_dir in splits.items():
        utts, problems = scan_split(split_dir, args.ext)
        for p in problems:
            logger.warning("%s", p)
        num_problems += len(problems)
        write_split(split_dir, args.out, name, utts)
        all_words.extend(u.words for u in utts)
        hours = sum(u.num_samples for u in utts) / 16000 / 3600
        logger.info(
            "%s: %d utterances (%.2f h at 16 kHz), %d problems", name, len(utts), hours, len(problems)
        )
    write_letter_dict(args.out / "dict.ltr.txt", all_words)
    print(
        f"wrote {len(splits)} split(s) to {args.out}"
        + (f" ({num_problems} problems skipped)" if num_problems else "")
    )
    return 0
