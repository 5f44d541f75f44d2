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
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@dataclass
class _Decoder:
    """Turns frame log-probabilities into text: best path, or beam search with an LM / lexicon."""

    vocab: Any
    lm: Any
    lexicon: Any
    beam_size: int
    use_beam: bool
    grid: list[tuple[float, float]]
    """The (lm_weight, word_bonus) pairs to decode with; more than one tunes them."""

    @property
    def tuning(self) -> bool:
        return len(self.grid) > 1

    def __call__(self, scores: list[torch.Tensor], lm_weight: float, word_bonus: float) -> list[str]:
        from speechvq.decoding import beam_search

        if not self.use_beam:
            return [self.vocab.decode(lp.argmax(dim=-1).tolist()) for lp in scores]  # best path
        options = dict(
            beam_size=self.beam_size,
            lm=self.lm,
            lm_weight=lm_weight,
            word_bonus=word_bonus,
            lexicon=self.lexicon,
        )
        return [beam_search(lp, self.vocab, **options)[0].text for lp in scores]  # type: ignore[arg-type]


@dataclass
class _Inputs:
    """What is transcribed: the model, its inputs and references; after :func:`_load_usable`, the
    usable inputs and why the others cannot be used."""

    model: Any
    vocab: Any
    ids: list[str]
    references: list[str] | None
    source: Any = None
    """The audio (audio models)."""
    units: Any = None
    tokenizer: Any = None
    """The units and their tokenizer (unit models)."""
    kept: list[int] = field(default_factory=list)
    """Indices of the usable inputs."""
    reasons: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    waves: dict[int, torch.Tensor] = field(default_factory=dict)
    """Input index -> waveform (audio models)."""
    unit_scores: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """(input index, log-probabilities), scored at load (unit models)."""


def _check_options(args: argparse.Namespace) -> tuple[torch.device, list[float], list[float]]:
    """Validate the options; (device, LM weights, word bonuses)."""
    if args.beam is not None and args.beam < 1:
        raise UserInputError(f"--beam must be >= 1, but is {args.beam}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, but is {args.batch_size}")
    device = check_device(args.device)
    if args.out:
        check_output_file(args.out, "--out")
    return device, _floats("--lm-weight", args.lm_weight), _floats("--word-bonus", args.word_bonus)


def _dataset_references(source: Any, column: str) -> list[str]:
    """A dataset's text column as references: words (letters for a column named ltr)."""
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in source.texts or []]
    if column == "ltr":
        return [" ".join("".join(t.split()).replace("|", " ").split()) for t in texts]
    return [" ".join(t.split()) for t in texts]


def _open_inputs(args: argparse.Namespace, device: torch.device) -> _Inputs:
    """The model (on ``device``, in eval mode), the inputs' ids and the references."""
    if _is_unit_ctc(args.model):
        from speechvq.units.ctc import load_unit_bert_ctc

        model, vocab, tokenizer = load_unit_bert_ctc(args.model)
        units = _unit_inputs(args.audio)
        ids = list(units.utterances)
        references = _references(args.labels, len(ids)) if args.labels else None
        return _Inputs(model.to(device).eval(), vocab, ids, references, units=units, tokenizer=tokenizer)
    model, vocab = load_model(args.model)
    ids, source = _inputs(args.audio, args.labels)
    if args.labels and _is_dataset(args.audio):
        references = _dataset_references(source, args.labels)
    else:
        references = _references(args.labels, len(ids)) if args.labels else None
    return _Inputs(model.to(device).eval(), vocab, ids, references, source=source)


def _load_usable(inputs: _Inputs, device: torch.device) -> None:
    """Load the audio (checked against the model's receptive field), or score the units."""
    if inputs.units is not None:
        inputs.unit_scores, empty = _unit_scores(inputs.model, inputs.tokenizer, inputs.units, device)
        inputs.reasons = Counter({"no_units": len(empty)} if empty else {})
        inputs.messages = [f"{inputs.ids[i]}: has no units (shorter than one frame)" for i in empty]
        inputs.kept = [i for i, _ in inputs.unit_scores]
        return
    waves, inputs.reasons, inputs.messages = _load_inputs(
        inputs.ids, inputs.source, inputs.model.receptive_field
    )
    inputs.waves = {i: w for i, w in enumerate(waves) if w is not None}
    inputs.kept = list(inputs.waves)


def _make_decoder(args: argparse.Namespace, vocab: Any, grid: list[tuple[float, float]]) -> _Decoder:
    lm = None
    if args.lm:
        from speechvq.text.ngram import load_language_model

        lm = load_language_model(args.lm, args.lm_unit)
    lexicon = _lexicon(args, lm)
    use_beam = (args.beam or 1) > 1 or lm is not None or lexicon is not None
    return _Decoder(vocab, lm, lexicon, args.beam or (16 if use_beam else 1), use_beam, grid)


def _audio_scores(
    inputs: _Inputs, batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """(input indices, their frame log-probabilities) a batch at a time, shortest inputs first."""
    waves = inputs.waves
    order = sorted(inputs.kept, key=lambda i: waves[i].numel())
    audio_s = 0.0
    with progress.bar(total=len(order), desc="transcribe") as shown:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            lengths = torch.tensor([waves[i].numel() for i in index])
            batch = torch.zeros(len(index), int(lengths.max()))
            for row, i in enumerate(index):
                batch[row, : waves[i].numel()] = waves[i]
            with torch.no_grad():
                out = inputs.model(batch.to(device), lengths.to(device))
            scores = torch.log_softmax(out.logits.float(), dim=-1).cpu()
            yield index, [scores[row, :n] for row, n in enumerate(out.lengths.tolist())]
            audio_s += float(lengths.sum()) / 16000  # _load_inputs decodes at 16 kHz
            shown.update(len(index))
            progress.set_audio_rate(shown, audio_s)


def _tune(inputs: _Inputs, decoder: _Decoder, log_probs: dict[int, torch.Tensor]) -> list[str]:
    """Decode with every weight pair, print the WER/CER table; the best pair's hypotheses."""
    from speechvq.metrics_asr import char_errors, word_errors

    assert inputs.references is not None
    print("lm_weight\tword_bonus\tWER\tCER")
    best: tuple[float, float] | None = None
    hypotheses, chosen = [""] * len(inputs.ids), decoder.grid[0]
    kept = inputs.kept
    scored_refs = [inputs.references[i] for i in kept]
    for lm_weight, word_bonus in decoder.grid:
        decoded = decoder([log_probs[i] for i in kept], lm_weight, word_bonus)
        texts = [""] * len(inputs.ids)
        for i, text in zip(kept, decoded):
            texts[i] = text
        wer = word_errors(scored_refs, decoded).rate
        cer = char_errors(scored_refs, decoded).rate
        print(f"{lm_weight:g}\t{word_bonus:g}\t{100 * wer:.2f}%\t{100 * cer:.2f}%", flush=True)
        if best is None or (wer, cer) < best:
            best, hypotheses, chosen = (wer, cer), texts, (lm_weight, word_bonus)
    print(f"best: --lm-weight {chosen[0]:g} --word-bonus={chosen[1]:g}")
    return hypotheses


def _hypotheses(inputs: _Inputs, decoder: _Decoder, batch_size: int, device: torch.device) -> list[str]:
    """One hypothesis per input ("" for an unusable one). One weight pair decodes batch by batch;
    several keep every utterance's log-probabilities and tune."""
    hypotheses = [""] * len(inputs.ids)
    log_probs: dict[int, torch.Tensor] = {}  # input index -> log-probabilities, when tuning
    batches = [([i], [lp]) for i, lp in inputs.unit_scores] if inputs.unit_scores else None
    for index, rows in batches if batches is not None else _audio_scores(inputs, batch_size, device):
        if decoder.tuning:
            log_probs.update(zip(index, rows))
        else:
            for i, text in zip(index, decoder(rows, *decoder.grid[0])):
                hypotheses[i] = text
    return _tune(inputs, decoder, log_probs) if decoder.tuning else hypotheses


def _report(args: argparse.Namespace, inputs: _Inputs, hypotheses: list[str]) -> None:
    """Write or print the hypotheses, warn about skipped inputs, print WER / CER."""
    from speechvq.metrics_asr import char_errors, word_errors

    if args.out:
        write_atomic(args.out, "".join(h + "\n" for h in hypotheses))
        log.info("wrote %d hypotheses to %s", len(hypotheses), args.out)
    else:
        for name, text in zip(inputs.ids, hypotheses):
            sys.stdout.write(f"{name}\t{text}\n")
    total, kept = len(inputs.ids), inputs.kept
    skipped = total - len(kept)
    if skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(inputs.reasons.items()))
        log.warning("%d of %d inputs skipped (%s); their hypotheses are empty lines", skipped, total, detail)
    if inputs.references is not None:
        refs, hyps = [inputs.references[i] for i in kept], [hypotheses[i] for i in kept]
        words = word_errors(refs, hyps)
        chars = char_errors(refs, hyps)
        print(
            f"WER {100 * words.rate:.2f}% ({words.errors}/{words.reference_length}: "
            f"{words.substitutions} sub, {words.deletions} del, {words.insertions} ins)  "
            f"CER {100 * chars.rate:.2f}% ({chars.errors}/{chars.reference_length})"
            + (f"  over {len(kept)} of {total} inputs ({skipped} skipped)" if skipped else ""),
            file=sys.stderr if not args.out else sys.stdout,
        )


def run(args: argparse.Namespace) -> int:
    device, lm_weights, word_bonuses = _check_options(args)
    inputs = _open_inputs(args, device)
    decoder = _make_decoder(args, inputs.vocab, [(a, b) for a in lm_weights for b in word_bonuses])
    if decoder.tuning and inputs.references is None:
        raise UserInputError("tuning --lm-weight / --word-bonus over several values needs --labels")
    _load_usable(inputs, device)
    if not inputs.kept:
        if len(inputs.ids) == 1:
            raise UserInputError(inputs.messages[0])
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(inputs.reasons.items()))
        raise UserInputError(
            f"none of the {len(inputs.ids)} inputs can be used ({detail}); first: {inputs.messages[0]}"
        )
    _report(args, inputs, _hypotheses(inputs, decoder, args.batch_size, device))
    return 0
