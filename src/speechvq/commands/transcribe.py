"""Transcribe audio with a fine-tuned CTC model; with references, report WER and CER.

Usage:
    speechvq transcribe exp/finetune/best data/test.tsv --labels data/test.wrd --out hyp.wrd
    speechvq transcribe exp/finetune/best a.wav b.flac
    speechvq transcribe hf_export data/test.tsv --labels data/test.ltr --beam 32 --lm words.arpa

MODEL is a speechvq CTC model directory (``finetune-ctc`` output) or a transformers export
written by ``speechvq convert --to hf``. AUDIO is a fairseq manifest (``.tsv``) or audio files.
Without ``--out`` every hypothesis is printed as ``ID<TAB>TEXT``; with it, the file gets one
hypothesis per line in input order (the ``.wrd`` format). ``--labels`` reads one reference per
input: ``.ltr`` files are fairseq letters, anything else words.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from speechvq.errors import UserInputError

log = logging.getLogger("speechvq.transcribe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="speechvq CTC model directory, or its transformers export")
    parser.add_argument("audio", nargs="+", help="a manifest (.tsv) or audio files")
    parser.add_argument("--labels", help="references, one line per input (.ltr letters or .wrd words)")
    parser.add_argument("--out", help="write hypotheses here, one per line, instead of printing them")
    parser.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy unless --lm (default 1)")
    parser.add_argument("--lm", help="n-gram language model: ARPA file, or a KenLM binary (needs [lm] extra)")
    parser.add_argument("--lm-unit", choices=["word", "char"], default="word", help="units of --lm")
    parser.add_argument("--lm-weight", type=float, default=0.5, help="alpha, weight of ln P_lm (default 0.5)")
    parser.add_argument("--word-bonus", type=float, default=0.0, help="beta, bonus per LM unit (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def load_model(directory: str):  # type: ignore[no-untyped-def]
    """(CtcModel, Vocabulary) from a speechvq CTC directory or a transformers export of one."""
    path = Path(directory)
    config = path / "config.json"
    if not config.is_file():
        raise UserInputError(f"{directory}: not a model directory (no config.json)")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{config}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(meta, dict) and meta.get("format") == "speechvq":
        from speechvq.models.ctc import load_ctc_pretrained

        return load_ctc_pretrained(path)
    from speechvq.interop.hf_ctc import load_hf_ctc

    return load_hf_ctc(path)


def _inputs(paths: list[str]) -> list[tuple[str, Path]]:
    """(id, audio path) of every input, in order."""
    if len(paths) == 1 and paths[0].endswith(".tsv"):
        from speechvq.data.manifest import read_manifest

        manifest = read_manifest(paths[0])
        return [(item.relpath, manifest.audio_path(item)) for item in manifest.items]
    return [(p, Path(p)) for p in paths]


def _references(path: str, count: int) -> list[str]:
    from speechvq.data.manifest import read_labels

    lines = read_labels(path)
    if len(lines) != count:
        raise UserInputError(f"{path}: has {len(lines)} lines, but there are {count} inputs")
    if path.endswith(".ltr"):
        return [" ".join("".join(line.split()).replace("|", " ").split()) for line in lines]
    return [" ".join(line.split()) for line in lines]


def run(args: argparse.Namespace) -> int:
    from speechvq.data.audio import load_audio
    from speechvq.decoding import beam_decode, greedy_decode
    from speechvq.metrics_asr import char_errors, word_errors

    if args.beam < 1:
        raise UserInputError(f"--beam must be >= 1, but is {args.beam}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, but is {args.batch_size}")
    model, vocab = load_model(args.model)
    model = model.to(args.device).eval()
    inputs = _inputs(args.audio)
    references = _references(args.labels, len(inputs)) if args.labels else None
    lm = None
    if args.lm:
        from speechvq.text.ngram import load_language_model

        lm = load_language_model(args.lm, args.lm_unit)
    use_beam = args.beam > 1 or lm is not None

    waves = [load_audio(path) for _, path in inputs]
    minimum = model.feature_encoder.receptive_field
    for (name, _), wave in zip(inputs, waves):
        if wave.numel() < minimum:
            raise UserInputError(f"{name}: {wave.numel()} samples is shorter than one frame ({minimum})")
    hypotheses: list[str] = [""] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: waves[i].numel())  # similar lengths per batch
    for start in range(0, len(order), args.batch_size):
        index = order[start : start + args.batch_size]
        lengths = torch.tensor([waves[i].numel() for i in index])
        batch = torch.zeros(len(index), int(lengths.max()))
        for row, i in enumerate(index):
            batch[row, : waves[i].numel()] = waves[i]
        with torch.no_grad():
            out = model(batch.to(args.device), lengths.to(args.device))
        if use_beam:
            texts = beam_decode(
                out.logits,
                out.lengths,
                vocab,
                beam_size=args.beam,
                lm=lm,
                lm_weight=args.lm_weight,
                word_bonus=args.word_bonus,
            )
        else:
            texts = greedy_decode(out.logits, out.lengths, vocab)
        for i, text in zip(index, texts):
            hypotheses[i] = text

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        log.info("wrote %d hypotheses to %s", len(hypotheses), args.out)
    else:
        for (name, _), text in zip(inputs, hypotheses):
            sys.stdout.write(f"{name}\t{text}\n")
    if references is not None:
        words = word_errors(references, hypotheses)
        chars = char_errors(references, hypotheses)
        print(
            f"WER {100 * words.rate:.2f}% ({words.errors}/{words.reference_length}: "
            f"{words.substitutions} sub, {words.deletions} del, {words.insertions} ins)  "
            f"CER {100 * chars.rate:.2f}% ({chars.errors}/{chars.reference_length})",
            file=sys.stderr if not args.out else sys.stdout,
        )
    return 0
