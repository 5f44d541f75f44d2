"""Transcript normalisation for corpus importers: Unicode form, case, punctuation, spaces.

The default makes LibriSpeech-style words (upper case, letters, digits and apostrophes within
words, single spaces), which fits fairseq's English letter dictionary. Every step can be turned
off; nothing is language-specific except :attr:`TextNormalizer.case` (``str.upper``/``lower``).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


@dataclass(frozen=True, kw_only=True)
class TextNormalizer:
    """How a transcript is normalised (see :meth:`__call__`)."""

    case: Literal["upper", "lower", "keep"] = "upper"
    """Case of the output."""
    punctuation: Literal["strip", "keep"] = "strip"
    """``strip``: every character that is neither a letter, a digit, a mark (accents) nor an
    apostrophe inside a word becomes a space (so ``"well-known,"`` -> ``"WELL KNOWN"``)."""
    unicode_form: Literal["NFKC", "NFC", "none"] = "NFKC"
    """Unicode normalisation applied first (NFKC also folds full-width forms and ligatures)."""

    def __call__(self, text: str) -> str:
        """The normalised transcript: steps in the order form, apostrophes, punctuation, case,
        whitespace (runs of spaces, tabs and newlines become one space; no leading/trailing)."""
        if self.unicode_form != "none":
            text = unicodedata.normalize(self.unicode_form, text)
        if self.punctuation == "strip":
            text = _strip_punctuation(text.translate(_APOSTROPHES))
        if self.case == "upper":
            text = text.upper()
        elif self.case == "lower":
            text = text.lower()
        return " ".join(text.split())


def _strip_punctuation(text: str) -> str:
    """Letters, digits and marks kept; an apostrophe kept only between two word characters."""
    out = []
    for i, ch in enumerate(text):
        inside_word = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        keep = unicodedata.category(ch)[0] in "LNM" or (ch == "'" and inside_word)
        out.append(ch if keep else " ")
    return "".join(out)
