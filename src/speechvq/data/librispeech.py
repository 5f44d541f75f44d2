"""The LibriSpeech layout: ``<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` plus
``<speaker>-<chapter>.trans.txt`` (``<utt-id> WORDS...`` per line)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from speechvq import progress
from speechvq.data.audio import audio_info
from speechvq.data.manifest import ManifestItem, words_to_letters, write_manifest
from speechvq.errors import UserInputError
from speechvq.files import read_text, write_atomic

logger = logging.getLogger(__name__)

SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)


@dataclass
class LibriUtterance:
    """One utterance of a LibriSpeech split."""

    relpath: str
    """``speaker/chapter/speaker-chapter-utt.flac``, relative to the split directory."""
    num_samples: int
    """Native frames of the audio file."""
    words: str
    """Transcript, as in ``trans.txt``."""


def read_trans(path: Path) -> dict[str, str]:
    """Read a ``*.trans.txt``: utterance id -> words."""
    out = {}
    for lineno, line in enumerate(read_text(path, "transcript file", max_bytes=None).splitlines(), start=1):
        if not line.strip():
            continue
        utt, _, words = line.strip().partition(" ")
        if not words.strip():
            raise UserInputError(f"{path}:{lineno}: expected '<utterance-id> WORDS', got {line!r}")
        out[utt] = words.strip()
    return out


def scan_split(split_dir: Path, ext: str = "flac") -> tuple[list[LibriUtterance], list[str]]:
    """Utterances of one split directory, sorted by path, and a list of problems found.

    Audio without a transcript line, transcript lines without audio, and unreadable audio are
    reported as problems (and left out), not raised.
    """
    utts: list[LibriUtterance] = []
    problems: list[str] = []
    chapters = sorted(split_dir.glob("*/*/*.trans.txt"))
    for trans in progress.track(chapters, desc=f"prepare {split_dir.name}", unit="chapter"):
        try:
            texts = read_trans(trans)
        except UnicodeDecodeError:
            problems.append(f"{trans}: transcript file is not valid UTF-8")
            continue
        except UserInputError as err:
            problems.append(str(err))
            continue
        audio = {p.stem: p for p in trans.parent.glob(f"*.{ext}")}
        for utt_id in sorted(set(audio) | set(texts)):
            if utt_id not in texts:
                problems.append(f"{audio[utt_id]}: no transcript line in {trans.name}")
                continue
            if utt_id not in audio:
                problems.append(f"{trans}: transcript for {utt_id} but no {utt_id}.{ext}")
                continue
            try:
                info = audio_info(audio[utt_id])
            except UserInputError as err:
                problems.append(str(err))
                continue
            rel = audio[utt_id].relative_to(split_dir).as_posix()
            utts.append(LibriUtterance(relpath=rel, num_samples=info.num_frames, words=texts[utt_id]))
    return utts, problems


def find_splits(root: Path) -> dict[str, Path]:
    """Split name -> directory, for a LibriSpeech root (or a split directory itself)."""
    if any(root.glob("*/*/*.trans.txt")):
        return {root.name: root}
    splits = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*/*/*.trans.txt"))}
    if not splits and (root / "LibriSpeech").is_dir():
        return find_splits(root / "LibriSpeech")
    return splits


def write_split(split_dir: Path, out_dir: Path, name: str, utts: list[LibriUtterance]) -> None:
    """Write ``name.tsv``, ``name.wrd`` and ``name.ltr`` for one split."""
    items = [ManifestItem(relpath=u.relpath, num_samples=u.num_samples, line=0) for u in utts]
    write_manifest(out_dir / f"{name}.tsv", split_dir, items)
    write_atomic(out_dir / f"{name}.wrd", "".join(u.words + "\n" for u in utts))
    write_atomic(out_dir / f"{name}.ltr", "".join(words_to_letters(u.words) + "\n" for u in utts))


def write_letter_dict(path: Path, transcripts: list[str]) -> None:
    """fairseq ``dict.ltr.txt``: ``SYMBOL COUNT`` per line, most frequent first."""
    counts: Counter[str] = Counter()
    for words in transcripts:
        counts.update(words_to_letters(words).split())
    write_atomic(
        path, "".join(f"{sym} {n}\n" for sym, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    )
