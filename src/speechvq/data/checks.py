"""Problem categories shared by ``speechvq validate`` and the skipping dataset."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# Category names, in a fixed order (the dataset stores the index of a category per item).
CATEGORIES = (
    "missing",
    "unreadable",
    "corrupt",
    "empty",
    "too_short",
    "non_finite",
    "out_of_range",
    "length_mismatch",
    "bad_transcript",
    "out_of_vocabulary",
    "other",
)

# Letters of fairseq's English LibriSpeech letter dictionary, plus the word separator.
DEFAULT_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ'|")


def categorize(message: str) -> str:
    """Map a loader error message to a category name."""
    m = message.lower()
    rules = (
        ("does not exist", "missing"),
        ("permission denied", "unreadable"),
        ("not readable", "unreadable"),
        ("not a readable file", "unreadable"),
        ("not a regular file", "unreadable"),
        ("nan or inf", "non_finite"),
        ("out of range", "out_of_range"),
        ("manifest lists", "length_mismatch"),
        ("headerless pcm", "unreadable"),
        ("decode", "corrupt"),
        ("corrupt", "corrupt"),
    )
    for needle, category in rules:
        if needle in m:
            return category
    return "other"


def transcript_problem(
    raw: str | bytes | None, vocab: frozenset[str] | set[str] | None
) -> tuple[str, str] | None:
    """(category, reason) for an unusable transcript, or None if it is fine.

    Args:
        raw: the label line (bytes are decoded as UTF-8).
        vocab: allowed characters (spaces are always allowed); None skips the check.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return "bad_transcript", f"transcript is not valid UTF-8 (byte {err.start})"
    if not raw.strip():
        return "bad_transcript", "transcript is empty"
    if vocab is not None:
        outside = sorted({c for c in raw if c not in vocab and not c.isspace()})
        if outside:
            shown = "".join(outside[:10])
            return "out_of_vocabulary", f"transcript has characters outside the vocabulary: {shown!r}"
    return None


def read_vocab(path: str) -> frozenset[str]:
    """Symbols of a fairseq dictionary (``dict.ltr.txt``: ``SYMBOL COUNT`` per line), as characters.

    Multi-character symbols (e.g. ``<unk>``) are ignored; ``|`` is the word boundary.
    """
    from speechvq.text.files import read_text_lines

    chars = set()
    for line in read_text_lines(path, "vocabulary file", "vocabulary file is not UTF-8 text"):
        sym = re.split(r"\s+", line.strip(), maxsplit=1)[0] if line.strip() else ""
        if len(sym) == 1:
            chars.add(sym)
    return frozenset(chars)


@dataclass
class SkipCounts:
    """Items a long run skipped instead of failing: the count per category and the first reason."""

    counts: Counter[str] = field(default_factory=Counter)
    """Skipped items per category (see :data:`CATEGORIES`)."""
    first: str | None = None
    """The message of the first skipped item (names its file and the problem)."""

    def add(self, category: str, message: str) -> None:
        """Count one skipped item."""
        self.counts[category] += 1
        if self.first is None:
            self.first = message

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``"missing: 2, corrupt: 1"``."""
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
