"""``speechvq import``: another toolkit's corpus -> fairseq manifests, labels and speaker lists.

Usage:
    speechvq import kaldi data/train --out data/sv --audio-root /path/to/recipe --valid-percent 5
    speechvq import lhotse manifests/recordings.jsonl.gz manifests/supervisions.jsonl.gz --out data/sv
    speechvq import lhotse manifests/cuts_train.jsonl.gz --out data/sv
    speechvq import ljspeech LJSpeech-1.1 --out data/lj --valid-percent 2 --split-by utterance
    speechvq import speechbrain train.csv --data-root /data/corpus --out data/sv
    speechvq import commonvoice cv-corpus/en/validated.tsv --out data/cv --valid-percent 5

Writes ``OUT/train.tsv`` (and ``valid.tsv``), ``.wrd``/``.ltr`` transcripts, ``.spk`` speakers,
``.ids`` corpus ids and ``dict.ltr.txt`` (see :mod:`speechvq.data.corpora.common`). The valid part is
speaker-disjoint by default. Transcripts are normalised: upper case, punctuation stripped
(apostrophes inside words kept), NFKC, single spaces; ``--case`` and ``--keep-punctuation`` change
that. Utterances without a transcript (in a transcribed corpus) or with unreadable audio are listed
and left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speechvq.errors import UserInputError

FORMATS = ("kaldi", "lhotse", "ljspeech", "speechbrain", "commonvoice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="corpus format")
    parser.add_argument(
        "source",
        nargs="+",
        help="kaldi: data dir; lhotse: manifest files or a directory of them; ljspeech: the corpus dir "
        "or metadata.csv; speechbrain: a .csv or .json; commonvoice: a split's .tsv",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--audio-root", type=Path, default=None, help="base of relative audio paths (default: current dir)"
    )
    parser.add_argument(
        "--data-root", default=None, help="speechbrain: the value of $data_root / {data_root}"
    )
    parser.add_argument(
        "--text-column", default=None, help="speechbrain: transcript column (default: wrd, ...)"
    )
    parser.add_argument("--case", choices=["upper", "lower", "keep"], default="upper", help="transcript case")
    parser.add_argument("--keep-punctuation", action="store_true", help="keep punctuation in the transcripts")
    parser.add_argument(
        "--unicode-form", choices=["NFKC", "NFC", "none"], default="NFKC", help="Unicode normalisation"
    )
    parser.add_argument("--valid-percent", type=float, default=0.0, help="percent of items for valid.tsv")
    parser.add_argument(
        "--split-by",
        choices=["speaker", "utterance"],
        default="speaker",
        help="valid split with disjoint speakers (default) or by utterance",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    parser.add_argument("--jobs", type=int, default=4, help="threads reading headers and cutting segments")


def run(args: argparse.Namespace) -> int:
    from speechvq.data.corpora import READERS, write_corpus
    from speechvq.text.normalize import TextNormalizer

    if not 0 <= args.valid_percent < 100:
        raise UserInputError(f"--valid-percent must be in [0, 100), but is {args.valid_percent}")
    sources = list(args.source)
    if len(sources) > 1 and args.format != "lhotse":
        raise UserInputError(f"{args.format} takes one source, but {len(sources)} were given")
    reader = READERS[args.format]
    utts = reader(
        *sources, audio_root=args.audio_root, data_root=args.data_root, text_column=args.text_column
    )
    normalizer = TextNormalizer(
        case=args.case,
        punctuation="keep" if args.keep_punctuation else "strip",
        unicode_form=args.unicode_form,
    )
    counts = write_corpus(
        utts, args.out, normalizer=normalizer, valid_percent=args.valid_percent, split_by=args.split_by,
        seed=args.seed, jobs=args.jobs,
    )  # fmt: skip
    parts = ", ".join(f"{n} {name}" for name, n in counts.items() if name != "skipped")
    skipped = counts.get("skipped", 0)
    print(f"{parts} items -> {args.out}" + (f"; {skipped} skipped (listed above)" if skipped else ""))
    return 0
