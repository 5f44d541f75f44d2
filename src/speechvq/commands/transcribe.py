"""Transcribe audio with a fine-tuned CTC model; with references, report WER and CER.

Usage:
    speechvq transcribe exp/finetune/best data/test.tsv --labels data/test.wrd --out hyp.wrd
    speechvq transcribe exp/finetune/best a.wav b.flac
    speechvq transcribe hf_export data/test.tsv --labels data/test.ltr --beam 32 --lm words.arpa
    speechvq transcribe exp/finetune/best data/dev.tsv --labels data/dev.wrd --lm words.arpa \
        --lexicon-from-lm --lm-weight 0.5,1,2 --word-bonus 0,1,2

MODEL is a speechvq CTC model directory (``finetune-ctc`` output) or a transformers export
written by ``speechvq convert --to hf``. For a CTC model on unit-BERT features (``finetune-ctc
--init UNIT_BERT``), the input is the ``export-units`` directory of the utterances instead of audio
(``speechvq transcribe exp/ft_units/best_model exp/units/test --labels data/test.wrd``). AUDIO is a fairseq manifest (``.tsv``), a local Hugging
Face dataset (``save_to_disk`` directory, parquet, audiofolder) or audio files. Without ``--out``
every hypothesis is printed as ``ID<TAB>TEXT``; with it, the file gets one hypothesis per line in
input order (the ``.wrd`` format). ``--labels`` reads one reference per input: ``.ltr`` files are
fairseq letters, anything else words; for a dataset it names the text column (``--labels text``).

``--lm-weight`` and ``--word-bonus`` take comma-separated lists: every combination is decoded from
the same logits, a WER/CER table is printed, and the best combination (lowest WER, then CER) gives
the hypotheses. This is how the two weights are tuned on a validation set (they need ``--labels``).

An input that cannot be used (missing, not a regular file, truncated, NaN or out-of-range samples,
a length that disagrees with the manifest, shorter than one frame) is skipped and counted: its
hypothesis is an empty line, the WER/CER cover the other inputs (the summary says how many), and a
warning gives the counts by reason. If no input can be used, the command fails with one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from speechvq import progress
from speechvq.commands._checks import check_device, check_finite
from speechvq.errors import UserInputError
from speechvq.files import check_output_file, read_json, write_atomic

log = logging.getLogger("speechvq.transcribe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="speechvq CTC model directory, or its transformers export")
    parser.add_argument("audio", nargs="+", help="a manifest (.tsv), a local HF dataset, or audio files")
    parser.add_argument(
        "--labels",
        help="references, one line per input (.ltr letters or .wrd words); a dataset's text column",
    )
    parser.add_argument("--out", help="write hypotheses here, one per line, instead of printing them")
    parser.add_argument("--beam", type=int, help="beam size (default: 1, greedy; 16 with --lm or a lexicon)")
    parser.add_argument("--lm", help="n-gram language model: ARPA file, or a KenLM binary (needs [lm] extra)")
    parser.add_argument("--lm-unit", choices=["word", "char"], default="word", help="units of --lm")
    parser.add_argument(
        "--lm-weight", default="0.5", help="alpha, weight of ln P_lm; a comma list tunes it (default 0.5)"
    )
    parser.add_argument(
        "--word-bonus", default="0", help="beta, bonus per LM unit; a comma list tunes it (default 0)"
    )
    parser.add_argument(
        "--lexicon", help="write only these words: one per line (flashlight lexicon files work too)"
    )
    parser.add_argument(
        "--lexicon-from-lm", action="store_true", help="write only the words of --lm (an ARPA word LM)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def load_model(directory: str):  # type: ignore[no-untyped-def]
    """(CtcModel, Vocabulary) from a speechvq CTC directory or a transformers export of one."""
    path = Path(directory)
    config = path / "config.json"
    if not config.exists():
        raise UserInputError(f"{directory}: not a model directory (no config.json)")
    meta = read_json(config, "model config")
    if meta.get("format") == "speechvq":
        from speechvq.models.ctc import load_ctc_pretrained

        return load_ctc_pretrained(path)
    from speechvq.interop.hf_ctc import load_hf_ctc

    return load_hf_ctc(path)


def _is_dataset(paths: list[str]) -> bool:
    """Whether the single input is a local HF dataset (a directory or a parquet file)."""
    return len(paths) == 1 and (Path(paths[0]).is_dir() or paths[0].endswith(".parquet"))


def _inputs(paths: list[str], labels: str | None = None):  # type: ignore[no-untyped-def]
    """(ids, an AudioSource of every input, in order): a manifest, a dataset (with its text
    column ``labels``), or audio files."""
    from speechvq.data.source import AudioSource, Utterance, open_source

    if (len(paths) == 1 and paths[0].endswith(".tsv")) or _is_dataset(paths):
        source = open_source(paths[0], labels if _is_dataset(paths) else None)
        if len(source) == 0:
            raise UserInputError(f"{paths[0]}: lists no audio to transcribe")
        return list(source.ids), source
    utts = [Utterance(name=p, data=p, num_frames=None) for p in paths]
    return list(paths), AudioSource(utts, None, "audio files")


def _load_inputs(
    ids: list[str], source: Any, minimum: int
) -> tuple[list[torch.Tensor | None], Counter[str], list[str]]:
    """Every input's waveform (16 kHz), or None for one that cannot be used; the counts and
    messages of those."""
    from speechvq.data.checks import categorize

    waves: list[torch.Tensor | None] = []
    reasons: Counter[str] = Counter()
    messages: list[str] = []
    for i in progress.track(range(len(ids)), desc="transcribe: load"):
        try:
            wav = source.load(i, 16000)  # checks a manifest's listed length too
            if wav.size < minimum:
                raise UserInputError(
                    f"{ids[i]}: too short: {wav.size} samples is shorter than one frame ({minimum})"
                )
        except UserInputError as err:
            waves.append(None)
            category = "too_short" if "too short" in str(err) else categorize(str(err))
            reasons[category] += 1
            messages.append(str(err))
            log.warning("skipping %s", err)
            continue
        waves.append(torch.from_numpy(wav))
    return waves, reasons, messages


def _references(path: str, count: int) -> list[str]:
    from speechvq.data.manifest import read_labels

    lines = read_labels(path)
    if len(lines) != count:
        raise UserInputError(f"{path}: has {len(lines)} lines, but there are {count} inputs")
    if path.endswith(".ltr"):
        return [" ".join("".join(line.split()).replace("|", " ").split()) for line in lines]
    return [" ".join(line.split()) for line in lines]


def _floats(option: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserInputError(f"{option}: expected numbers separated by commas, got {text!r}") from None
    check_finite(option, values)
    return values


def _lexicon(args: argparse.Namespace, lm: object):  # type: ignore[no-untyped-def]
    from speechvq.decoding import Lexicon
    from speechvq.text.ngram import ArpaLM

    if args.lexicon and args.lexicon_from_lm:
        raise UserInputError("give --lexicon or --lexicon-from-lm, not both")
    if args.lexicon:
        return Lexicon.load(args.lexicon, lm)  # type: ignore[arg-type]
    if args.lexicon_from_lm:
        if not isinstance(lm, ArpaLM) or lm.unit != "word":
            raise UserInputError("--lexicon-from-lm needs a word LM in ARPA format (--lm FILE.arpa)")
        return Lexicon.build(lm.words, lm)
    return None


def _is_unit_ctc(directory: str) -> bool:
    from speechvq.units.ctc import CONFIG_NAME

    return (Path(directory) / CONFIG_NAME).is_file()


def _unit_inputs(paths: list[str]):  # type: ignore[no-untyped-def]
    """The units directory that a unit-BERT CTC model transcribes (``export-units`` output)."""
    from speechvq.units.io import read_units

    if len(paths) != 1 or not (Path(paths[0]) / "units.txt").is_file():
        raise UserInputError(
            f"{' '.join(paths)}: a unit-BERT CTC model transcribes units: give one `export-units` "
            "directory (with units.txt), not audio"
        )
    units = read_units(paths[0])
    if len(units) == 0:
        raise UserInputError(f"{paths[0]}: lists no utterances to transcribe")
    return units


def _unit_scores(model: Any, tokenizer: Any, units: Any, device: torch.device):  # type: ignore[no-untyped-def]
    """Per utterance with units: (index, frame log-probabilities); the indices without units."""
    scores: list[tuple[int, torch.Tensor]] = []
    empty: list[int] = []
    for i in progress.track(range(len(units)), desc="transcribe"):
        ids, repeats = tokenizer.encode(units.frames(i))
        if len(ids) == 0:
            empty.append(i)
            continue
        with torch.no_grad():
            out = model(
                torch.from_numpy(ids)[None].to(device),
                torch.tensor([len(ids)], device=device),
                torch.from_numpy(repeats)[None].to(device),
            )
        scores.append((i, out.log_probs[0, : int(out.lengths[0])].float().cpu()))
    return scores, empty


def run(args: argparse.Namespace) -> int:
    from speechvq.decoding import beam_search
    from speechvq.metrics_asr import char_errors, word_errors

    if args.beam is not None and args.beam < 1:
        raise UserInputError(f"--beam must be >= 1, but is {args.beam}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, but is {args.batch_size}")
    device = check_device(args.device)
    if args.out:
        check_output_file(args.out, "--out")
    lm_weights = _floats("--lm-weight", args.lm_weight)
    word_bonuses = _floats("--word-bonus", args.word_bonus)
    unit_model = _is_unit_ctc(args.model)
    if unit_model:
        from speechvq.units.ctc import load_unit_bert_ctc

        model, vocab, tokenizer = load_unit_bert_ctc(args.model)
        units = _unit_inputs(args.audio)
        ids, source = list(units.utterances), None
    else:
        model, vocab = load_model(args.model)
        ids, source = _inputs(args.audio, args.labels)
    model = model.to(device).eval()
    inputs = list(zip(ids, range(len(ids))))
    if args.labels and not unit_model and _is_dataset(args.audio):
        # a dataset's text column: words (letters for a column named ltr)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in source.texts or []]
        letters = args.labels == "ltr"
        references = [
            " ".join("".join(t.split()).replace("|", " ").split()) if letters else " ".join(t.split())
            for t in texts
        ]
    else:
        references = _references(args.labels, len(inputs)) if args.labels else None
    lm = None
    if args.lm:
        from speechvq.text.ngram import load_language_model

        lm = load_language_model(args.lm, args.lm_unit)
    lexicon = _lexicon(args, lm)
    grid = [(a, b) for a in lm_weights for b in word_bonuses]
    if len(grid) > 1 and references is None:
        raise UserInputError("tuning --lm-weight / --word-bonus over several values needs --labels")
    use_beam = (args.beam or 1) > 1 or lm is not None or lexicon is not None
    beam_size = args.beam or (16 if use_beam else 1)

    if unit_model:
        unit_scores, empty = _unit_scores(model, tokenizer, units, device)
        waves: list[torch.Tensor | None] = []
        reasons: Counter[str] = Counter({"no_units": len(empty)} if empty else {})
        messages = [f"{ids[i]}: has no units (shorter than one frame)" for i in empty]
        kept = [i for i, _ in unit_scores]
    else:
        waves, reasons, messages = _load_inputs(ids, source, model.feature_encoder.receptive_field)
        kept = [i for i, w in enumerate(waves) if w is not None]
    if not kept:
        if len(inputs) == 1:
            raise UserInputError(messages[0])
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        raise UserInputError(f"none of the {len(inputs)} inputs can be used ({detail}); first: {messages[0]}")

    def decode(scores: list[torch.Tensor], lm_weight: float, word_bonus: float) -> list[str]:
        if not use_beam:
            return [vocab.decode(lp.argmax(dim=-1).tolist()) for lp in scores]  # best path
        options = dict(
            beam_size=beam_size, lm=lm, lm_weight=lm_weight, word_bonus=word_bonus, lexicon=lexicon
        )
        return [beam_search(lp, vocab, **options)[0].text for lp in scores]  # type: ignore[arg-type]

    # one weight pair: decode batch by batch; several: keep every utterance's log-probabilities
    tuning = len(grid) > 1
    log_probs: dict[int, torch.Tensor] = {}  # input index -> log-probabilities, when tuning
    hypotheses: list[str] = [""] * len(inputs)
    loaded = {i: w for i, w in enumerate(waves) if w is not None}
    order = sorted(kept, key=lambda i: loaded[i].numel()) if not unit_model else []
    shown = progress.bar(total=len(order), desc="transcribe") if not unit_model else None
    audio_s = 0.0
    if unit_model:  # scored above, one utterance at a time
        for i, lp in unit_scores:
            if tuning:
                log_probs[i] = lp
            else:
                hypotheses[i] = decode([lp], *grid[0])[0]
    for start in range(0, len(order), args.batch_size):
        index = order[start : start + args.batch_size]
        lengths = torch.tensor([loaded[i].numel() for i in index])
        batch = torch.zeros(len(index), int(lengths.max()))
        for row, i in enumerate(index):
            batch[row, : loaded[i].numel()] = loaded[i]
        with torch.no_grad():
            out = model(batch.to(device), lengths.to(device))
        scores = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        rows = [scores[row, :n] for row, n in enumerate(out.lengths.tolist())]
        if tuning:
            for i, lp in zip(index, rows):
                log_probs[i] = lp
        else:
            for i, text in zip(index, decode(rows, *grid[0])):
                hypotheses[i] = text
        audio_s += float(lengths.sum()) / 16000  # _load_inputs decodes at 16 kHz
        assert shown is not None
        shown.update(len(index))
        progress.set_audio_rate(shown, audio_s)
    if shown is not None:
        shown.close()

    if tuning:
        assert references is not None
        print("lm_weight\tword_bonus\tWER\tCER")
        best: tuple[float, float] | None = None
        chosen = grid[0]
        scored_refs = [references[i] for i in kept]
        for lm_weight, word_bonus in grid:
            decoded = decode([log_probs[i] for i in kept], lm_weight, word_bonus)
            texts = [""] * len(inputs)
            for i, text in zip(kept, decoded):
                texts[i] = text
            wer = word_errors(scored_refs, decoded).rate
            cer = char_errors(scored_refs, decoded).rate
            print(f"{lm_weight:g}\t{word_bonus:g}\t{100 * wer:.2f}%\t{100 * cer:.2f}%", flush=True)
            if best is None or (wer, cer) < best:
                best, hypotheses, chosen = (wer, cer), texts, (lm_weight, word_bonus)
        print(f"best: --lm-weight {chosen[0]:g} --word-bonus={chosen[1]:g}")

    if args.out:
        write_atomic(args.out, "".join(h + "\n" for h in hypotheses))
        log.info("wrote %d hypotheses to %s", len(hypotheses), args.out)
    else:
        for (name, _), text in zip(inputs, hypotheses):
            sys.stdout.write(f"{name}\t{text}\n")
    skipped = len(inputs) - len(kept)
    if skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        log.warning(
            "%d of %d inputs skipped (%s); their hypotheses are empty lines", skipped, len(inputs), detail
        )
    if references is not None:
        refs, hyps = [references[i] for i in kept], [hypotheses[i] for i in kept]
        words = word_errors(refs, hyps)
        chars = char_errors(refs, hyps)
        print(
            f"WER {100 * words.rate:.2f}% ({words.errors}/{words.reference_length}: "
            f"{words.substitutions} sub, {words.deletions} del, {words.insertions} ins)  "
            f"CER {100 * chars.rate:.2f}% ({chars.errors}/{chars.reference_length})"
            + (f"  over {len(kept)} of {len(inputs)} inputs ({skipped} skipped)" if skipped else ""),
            file=sys.stderr if not args.out else sys.stdout,
        )
    return 0
