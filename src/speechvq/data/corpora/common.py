"""What every importer shares: the utterance record, segment cutting, splits and the writer.

Output of :func:`write_corpus` in ``OUT``, for each split (``train``, and ``valid`` with
``valid_percent`` > 0):

* ``<split>.tsv``: the fairseq manifest (root = the deepest directory holding all the audio);
* ``<split>.wrd`` / ``<split>.ltr``: normalised words and fairseq letters, one line per item
  (only when the corpus has transcripts);
* ``<split>.spk``: the speaker of each item (only when the corpus names speakers);
* ``<split>.ids``: the corpus's own utterance id of each item;
* ``dict.ltr.txt``: the letter dictionary of the training transcripts.

An utterance that is a segment of a longer recording (Kaldi ``segments``, lhotse supervisions) is
cut out into ``OUT/segments/<id>.flac`` (``.wav`` for float audio) at the recording's own rate,
because a fairseq manifest lists whole files.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from speechvq import progress
from speechvq.data.audio import audio_info
from speechvq.data.manifest import ManifestItem, words_to_letters, write_manifest
from speechvq.errors import UserInputError
from speechvq.text.normalize import TextNormalizer

logger = logging.getLogger(__name__)


@dataclass
class CorpusUtterance:
    """One utterance of an imported corpus."""

    id: str
    """The corpus's own utterance id."""
    audio: Path
    """The audio file (the whole recording for a segment)."""
    text: str | None = None
    """The transcript as the corpus gives it (normalised on writing); None if there is none."""
    speaker: str | None = None
    """Speaker id, if the corpus names one."""
    start_s: float | None = None
    """Segment start in the recording in seconds; None for the whole file."""
    end_s: float | None = None
    """Segment end in seconds; None for the end of the file."""
    origin: str = ""
    """Where the utterance was listed (``file:line``), for messages."""

    @property
    def is_segment(self) -> bool:
        return self.start_s is not None or self.end_s is not None


@dataclass
class _Written:
    utt: CorpusUtterance
    path: Path
    num_samples: int


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def _segment_file(utt: CorpusUtterance, out_dir: Path) -> Path:
    """Cut ``utt``'s segment out of its recording into ``out_dir``; the written path."""
    try:
        info = sf.info(str(utt.audio))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise UserInputError(f"{utt.audio}: cannot decode audio: {err}") from None
    rate = info.samplerate
    start = round((utt.start_s or 0.0) * rate)
    stop = info.frames if utt.end_s is None or utt.end_s < 0 else min(round(utt.end_s * rate), info.frames)
    if not 0 <= start < stop:
        raise UserInputError(
            f"{utt.origin or utt.id}: segment {utt.start_s}-{utt.end_s} s is empty or outside "
            f"{utt.audio} ({info.frames / rate:.2f} s)"
        )
    data, _ = sf.read(str(utt.audio), start=start, stop=stop, dtype="float32", always_2d=True)
    integer = info.subtype in ("PCM_16", "PCM_S8", "PCM_U8", "PCM_24")
    name = _SAFE_ID.sub("_", utt.id)
    path = out_dir / (f"{name}.flac" if integer else f"{name}.wav")
    subtype = ("PCM_24" if info.subtype == "PCM_24" else "PCM_16") if integer else "FLOAT"
    out_dir.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def _materialise(utt: CorpusUtterance, segments_dir: Path) -> _Written | str:
    """The file and length of ``utt`` (cutting a segment), or a problem message."""
    try:
        path = _segment_file(utt, segments_dir) if utt.is_segment else utt.audio
        info = audio_info(path)
    except UserInputError as err:
        return f"{utt.origin + ': ' if utt.origin else ''}{err}"
    return _Written(utt=utt, path=path, num_samples=info.num_frames)


def split_valid(
    written: list[_Written], valid_percent: float, seed: int, *, by_speaker: bool
) -> tuple[list[_Written], list[_Written]]:
    """(train, valid): disjoint speakers with ``by_speaker`` (every item must name one), else
    a seeded random ``valid_percent`` of the items.

    Speakers are drawn in a seeded random order until the valid part holds at least
    ``valid_percent`` of the items; at least one speaker stays for training.
    """
    if valid_percent <= 0 or not written:
        return written, []
    rng = random.Random(seed)
    if by_speaker:
        counts = Counter(w.utt.speaker for w in written)
        speakers = sorted(counts)
        if len(speakers) < 2:
            raise UserInputError(
                f"--valid-percent {valid_percent}: the corpus has one speaker, so no speaker-disjoint "
                "split exists; use --split-by utterance"
            )
        rng.shuffle(speakers)
        held: set[str] = set()
        target = valid_percent / 100 * len(written)
        for spk in speakers[:-1]:  # at least one speaker stays for training
            if sum(counts[s] for s in held) >= target:
                break
            held.add(spk)
        return [w for w in written if w.utt.speaker not in held], [
            w for w in written if w.utt.speaker in held
        ]
    chosen = [rng.random() < valid_percent / 100 for _ in written]
    return [w for w, v in zip(written, chosen) if not v], [w for w, v in zip(written, chosen) if v]


def _letter_dict(words: list[str]) -> list[str]:
    counts = Counter(ch for line in words for ch in line.replace(" ", "|") + ("|" if line else ""))
    return [f"{sym} {n}" for sym, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def write_corpus(
    utts: list[CorpusUtterance],
    out_dir: str | os.PathLike[str],
    *,
    normalizer: TextNormalizer | None = None,
    valid_percent: float = 0.0,
    split_by: str = "speaker",
    seed: int = 42,
    jobs: int = 4,
) -> dict[str, int]:
    """Write manifests, labels and speaker lists for ``utts`` (layout: see the module docstring).

    Args:
        utts: the utterances, in corpus order (kept within each split).
        out_dir: the output directory (created).
        normalizer: transcript normalisation (default :class:`TextNormalizer`'s defaults).
        valid_percent: percent of the items for ``valid`` (0: ``train`` only).
        split_by: ``speaker`` (disjoint speakers; needs speakers) or ``utterance``.
        seed: seed of the split.
        jobs: threads that read headers and cut segments.

    Returns:
        Items per split, plus ``skipped``: utterances left out (unreadable audio, no transcript
        in a transcribed corpus, an empty segment), each logged with its reason.

    Raises:
        UserInputError: no utterance, or none readable; ids that repeat.
    """
    out = Path(out_dir)
    if not utts:
        raise UserInputError(f"{out}: the corpus lists no utterances")
    repeated = [k for k, n in Counter(u.id for u in utts).items() if n > 1]
    if repeated:
        raise UserInputError(
            f"utterance id {repeated[0]!r} is listed {Counter(u.id for u in utts)[repeated[0]]} times"
        )
    if split_by not in ("speaker", "utterance"):
        raise UserInputError(f"--split-by must be 'speaker' or 'utterance', but is {split_by!r}")
    labelled = any(u.text is not None for u in utts)
    problems: list[str] = []
    if labelled:
        utts = _with_transcripts(utts, normalizer or TextNormalizer(), problems)
    written = _materialise_all(utts, out / "segments", jobs, problems)
    if not written:
        raise UserInputError(
            f"{out}: no utterance could be imported ({problems[0] if problems else 'none listed'})"
        )
    by_speaker = split_by == "speaker"
    if by_speaker and valid_percent > 0 and not all(w.utt.speaker is not None for w in written):
        raise UserInputError(
            "--split-by speaker: the corpus does not name a speaker for every utterance; "
            "use --split-by utterance"
        )
    train, valid = split_valid(written, valid_percent, seed, by_speaker=by_speaker)
    parts = [("train", train)] + ([("valid", valid)] if valid_percent > 0 else [])
    counts = _write_splits(out, written, parts, labelled)
    counts["skipped"] = len(problems)
    return counts


def _with_transcripts(
    utts: list[CorpusUtterance], normalizer: TextNormalizer, problems: list[str]
) -> list[CorpusUtterance]:
    """The utterances whose transcript is not empty after normalisation (normalised in place);
    the others are added to ``problems``."""
    kept = []
    for u in utts:
        text = normalizer(u.text) if u.text is not None else ""
        if not text:
            problems.append(
                f"{u.origin or u.id}: no transcript{'' if u.text is None else ' after normalisation'}"
            )
            continue
        u.text = text
        kept.append(u)
    return kept


def _materialise_all(
    utts: list[CorpusUtterance], segments_dir: Path, jobs: int, problems: list[str]
) -> list[_Written]:
    """Read every utterance's header (cutting segments) on ``jobs`` threads; the failures are
    added to ``problems`` and logged with every earlier problem."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(
            progress.track(
                pool.map(lambda u: _materialise(u, segments_dir), utts),
                total=len(utts),
                desc="import",
                unit="utt",
            )
        )
    problems += [r for r in results if isinstance(r, str)]
    for p in problems:
        logger.warning("skipped %s", p)
    return [r for r in results if isinstance(r, _Written)]


def _write_splits(
    out: Path, written: list[_Written], parts: list[tuple[str, list[_Written]]], labelled: bool
) -> dict[str, int]:
    """Each split's manifest (relative to the audio's common directory), ids, transcripts and
    speakers, and the letter dictionary of ``train``; the items per split."""
    root = Path(os.path.commonpath([str(w.path.resolve().parent) for w in written]))
    with_speakers = all(w.utt.speaker is not None for w in written)
    counts = {}
    for name, part in parts:
        write_manifest(
            out / f"{name}.tsv",
            root,
            [ManifestItem(w.path.resolve().relative_to(root).as_posix(), w.num_samples, 0) for w in part],
        )
        _write_lines(out / f"{name}.ids", [w.utt.id for w in part])
        if labelled:
            _write_lines(out / f"{name}.wrd", [w.utt.text or "" for w in part])
            _write_lines(out / f"{name}.ltr", [words_to_letters(w.utt.text or "") for w in part])
        if with_speakers:
            _write_lines(out / f"{name}.spk", [str(w.utt.speaker) for w in part])
        counts[name] = len(part)
    if labelled:
        _write_lines(out / "dict.ltr.txt", _letter_dict([w.utt.text or "" for w in parts[0][1]]))
    return counts


def _write_lines(path: Path, lines: list[str]) -> None:
    for line in lines:
        if "\n" in line:
            raise UserInputError(f"{path}: a value holds a newline: {line[:60]!r}")
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def resolve_audio(path: str, base: Path) -> Path:
    """``path`` as given in a corpus file: absolute, or relative to ``base``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p
