"""``speechvq synth-corpus``: the embedded espeak-ng corpus in LibriSpeech layout.

Usage:
    speechvq synth-corpus --out data/synth --hours 1 --seed 0

Writes ``OUT/{train,dev,test}/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` (16 kHz),
``<speaker>-<chapter>.trans.txt``, and beside each utterance ``.phones`` and ``.words``
alignments (``start_s end_s label`` per line); plus ``SPEAKERS.TXT``, ``vocab.txt`` (every word
the texts can use: a decoding lexicon), ``lm_text.txt`` (``--lm-sentences`` other sentences of the
same grammar, for ``speechvq train-lm``) and ``summary.json``. Splits are speaker-disjoint; the
output is identical for the same seed and arguments. Prepare manifests with ``speechvq prepare-librispeech OUT --out MANIFESTS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from speechvq.data.synth import cpu_count, write_corpus
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--hours", type=float, default=1.0, help="about this many hours of audio (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of texts, speakers and synthesis")
    parser.add_argument(
        "--num-speakers", type=int, default=40, help="distinct synthetic speakers (default 40)"
    )
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (default: all CPUs)")
    parser.add_argument(
        "--lm-sentences",
        type=int,
        default=50000,
        help="sentences written to lm_text.txt for LM training; 0: none (default 50000)",
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"{args.out}: output directory is not empty")
    if not math.isfinite(args.hours):
        raise UserInputError(f"--hours must be a finite number, but is {args.hours} instead")
    if args.lm_sentences < 0:
        raise UserInputError(f"--lm-sentences must be >= 0, but is {args.lm_sentences}")
    jobs = args.jobs or cpu_count()
    start = time.perf_counter()
    summary = write_corpus(
        args.out,
        hours=args.hours,
        seed=args.seed,
        num_speakers=args.num_speakers,
        jobs=jobs,
        lm_sentences_count=args.lm_sentences,
    )
    elapsed = time.perf_counter() - start
    total = sum(summary["seconds"].values())
    summary["generation_seconds"] = round(elapsed, 2)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    splits = ", ".join(f"{k} {v / 60:.1f} min" for k, v in summary["seconds"].items())
    print(
        f"{total / 3600:.3f} h of speech ({splits}) from {args.num_speakers} speakers in {elapsed:.1f} s "
        f"with {jobs} processes ({total / max(elapsed, 1e-9):.0f}x real time) -> {args.out}"
    )
    return 0
