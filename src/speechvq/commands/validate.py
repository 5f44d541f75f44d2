"""``speechvq validate``: list every problem in a manifest (or local dataset) and exit non-zero.

Usage:
    speechvq validate data/manifests/train.tsv
    speechvq validate data/manifests/train.tsv --labels ltr --vocab data/manifests/dict.ltr.txt

Every audio file is decoded. Reported, one ``file: reason`` line each: bad manifest lines,
missing / unreadable / corrupt files, zero or too few samples, NaN/inf samples, lengths that
disagree with the manifest (with a sample-rate diagnosis), and transcripts that are not UTF-8,
empty, or hold characters outside the vocabulary. Exit code 0 if clean, 1 if problems were found.
Label files ``<manifest>.wrd`` / ``.ltr`` beside the manifest are checked when present.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from speechvq import progress
from speechvq.data.audio import RawFormat
from speechvq.data.checks import DEFAULT_LETTERS, categorize, read_vocab, transcript_problem
from speechvq.data.manifest import parse_manifest
from speechvq.data.source import AudioSource, manifest_source, open_source, read_label_lines
from speechvq.errors import UserInputError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="manifest .tsv or local Hugging Face dataset")
    parser.add_argument(
        "--labels",
        action="append",
        default=None,
        help="label file, or ltr/wrd beside the manifest, or a dataset text column (repeatable); "
        "default: the manifest's .wrd/.ltr when present",
    )
    parser.add_argument(
        "--vocab", type=Path, default=None, help="fairseq dict (dict.ltr.txt) of allowed characters"
    )
    parser.add_argument("--no-vocab-check", action="store_true", help="do not check transcript characters")
    parser.add_argument("--sample-rate", type=int, default=16000, help="rate the manifest lengths refer to")
    parser.add_argument(
        "--min-samples", type=int, default=400, help="fewer samples is a problem (default 400 = 25 ms)"
    )
    parser.add_argument(
        "--raw-format", type=_raw_format, default=None, help="RATE:CHANNELS:SUBTYPE for .raw files"
    )
    parser.add_argument("--jobs", type=int, default=4, help="decoding threads")
    parser.add_argument("--max-print", type=int, default=0, help="print at most this many problems (0: all)")


def _raw_format(spec: str) -> RawFormat:
    try:
        return RawFormat.parse(spec)
    except UserInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_audio(
    source: AudioSource, i: int, sample_rate: int, min_samples: int, raw: RawFormat | None
) -> tuple[str, str] | None:
    """(category, message) for utterance ``i``'s audio, or None if it is fine."""
    utt = source.utterance(i)
    try:
        wav = source.load(i, sample_rate, raw)
    except UserInputError as err:
        return categorize(str(err)), str(err)
    except Exception as err:
        return "other", f"{utt.name}: {type(err).__name__}: {err}"
    if wav.size == 0:
        return "empty", f"{utt.name}: has no samples"
    if wav.size < min_samples:
        return "too_short", f"{utt.name}: too few samples ({wav.size} < {min_samples} at {sample_rate} Hz)"
    return None


def _label_sets(args: argparse.Namespace) -> list[str]:
    if args.labels is not None:
        return list(args.labels)
    if args.source.suffix == ".tsv":
        return [s for s in ("wrd", "ltr") if args.source.with_suffix("." + s).exists()]
    return []


def _vocab(args: argparse.Namespace, label: str) -> frozenset[str] | None:
    if args.no_vocab_check:
        return None
    if args.vocab is not None:
        return read_vocab(str(args.vocab))
    beside = args.source.parent / "dict.ltr.txt"
    if args.source.suffix == ".tsv" and beside.exists():
        return read_vocab(str(beside)) | {"|"}
    return DEFAULT_LETTERS if label.endswith("ltr") else DEFAULT_LETTERS - {"|"}


def validate(args: argparse.Namespace) -> tuple[list[str], Counter[str], int]:
    """All problems as ``file: reason`` lines, their counts per category, and the item count."""
    problems: list[tuple[str, str]] = []
    if args.source.is_file() and args.source.suffix == ".tsv":
        manifest, bad_lines = parse_manifest(args.source)
        problems += [("bad_manifest_line", p) for p in bad_lines]
        source = manifest_source(manifest, None)
    else:
        source = open_source(args.source)
    n = len(source)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = pool.map(
            lambda i: check_audio(source, i, args.sample_rate, args.min_samples, args.raw_format), range(n)
        )
        problems += [r for r in progress.track(results, total=n, desc="validate") if r is not None]
    for label in _label_sets(args):
        vocab = _vocab(args, label)
        if args.source.suffix == ".tsv":
            path = Path(label)
            if not path.exists() and label in ("ltr", "wrd"):
                path = args.source.with_suffix("." + label)
            lines: list = read_label_lines(path)
            if len(lines) != n:
                problems.append(
                    ("label_count", f"{path}: has {len(lines)} lines, but the manifest has {n} items")
                )
            names = [f"{path}:{k + 1} ({source.utterance(k).name})" for k in range(min(n, len(lines)))]
        else:
            src = open_source(args.source, label)
            lines = list(src.texts or [])
            names = [f"{args.source}[{k}] column {label!r}" for k in range(len(lines))]
        for name, raw in zip(names, lines):
            problem = transcript_problem(raw, vocab)
            if problem is not None:
                problems.append((problem[0], f"{name}: {problem[1]}"))
    counts = Counter(cat for cat, _ in problems)
    return [msg for _, msg in problems], counts, n


def run(args: argparse.Namespace) -> int:
    messages, counts, n = validate(args)
    shown = messages if args.max_print <= 0 else messages[: args.max_print]
    for msg in shown:
        print(msg)
    if len(shown) < len(messages):
        print(f"... and {len(messages) - len(shown)} more")
    if messages:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(f"{args.source}: {len(messages)} problem(s) in {n} items ({detail})")
        return 1
    print(f"{args.source}: {n} items, no problems")
    return 0
