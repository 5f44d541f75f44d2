"""``speechvq train-lm``: an n-gram language model for beam search, written as ARPA.

Usage:
    speechvq train-lm data/synth/lm_text.txt --order 3 --out data/lm/3gram.arpa
    speechvq train-lm data/train.ltr --unit char --order 6 --out data/lm/char6.arpa

TEXT holds one sentence per line. For a word LM (``--unit word``) the units are its
whitespace-separated words; for a character LM (``--unit char``) the letters of the words with
``|`` between words, the units of a letter vocabulary. A fairseq letters file (``.ltr``:
``T H E | C A T |``) reads as the words it spells.
The model is interpolated Witten-Bell (:func:`speechvq.text.train_ngram`), pure Python: meant for
the corpora this project trains on. For LibriSpeech-sized text use KenLM's ``lmplz``; its ARPA
output is read by ``transcribe --lm`` the same way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from speechvq.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", type=Path, help="training text, one sentence per line")
    parser.add_argument("--out", type=Path, required=True, help="ARPA file to write")
    parser.add_argument("--order", type=int, default=3, help="n of the n-grams (default 3)")
    parser.add_argument("--unit", choices=["word", "char"], default="word", help="word or letter units")


def sentence_units(line: str, unit: str, letters_file: bool = False) -> list[str]:
    """The units of one text line: its words, or its letters with ``|`` between words.

    ``letters_file``: the line is fairseq letters (``T H E | C A T |``), already char units.
    """
    if letters_file:
        line = " ".join("".join(line.split()).replace("|", " ").split())
    words = line.split()
    return words if unit == "word" else list("|".join(words))


def run(args: argparse.Namespace) -> int:
    from speechvq.files import check_output_file
    from speechvq.text.files import read_text_lines
    from speechvq.text.ngram import train_ngram

    if args.order < 1:
        raise UserInputError(f"--order must be >= 1, but is {args.order}")
    if args.order > 20:
        raise UserInputError(f"--order must be at most 20, but is {args.order}")
    check_output_file(args.out, "--out")
    lines = read_text_lines(args.text, "text file")
    letters_file = args.text.suffix == ".ltr"
    sentences = [u for u in (sentence_units(line, args.unit, letters_file) for line in lines) if u]
    if not sentences:
        raise UserInputError(f"{args.text}: holds no sentence")
    start = time.perf_counter()
    lm = train_ngram(sentences, order=args.order, unit=args.unit)
    lm.save(args.out)
    counts = ", ".join(f"{len(lm.ngrams[n])} {n}-grams" for n in sorted(lm.ngrams))
    print(
        f"{len(sentences)} sentences, {sum(map(len, sentences))} {args.unit}s -> {counts} "
        f"in {time.perf_counter() - start:.1f} s -> {args.out}"
    )
    return 0
