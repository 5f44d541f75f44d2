"""Word and character error rates from a Levenshtein alignment.

WER = (S + D + I) / N over the reference words of the whole corpus (not a mean of per-utterance
rates); CER the same over characters, spaces between words included (jiwer's ``cer``). Words are
split on whitespace, so extra spaces in a hypothesis do not count; for CER, leading/trailing
whitespace is stripped and runs of spaces are reduced to one. No other normalisation (case,
punctuation) is applied: normalise both sides beforehand if needed. The counts equal jiwer's
(tested against it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class ErrorCounts:
    """Edit operations of an alignment (or a sum of alignments)."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0
    """N, units in the reference(s)."""

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / N; 0 for an empty reference with no errors, inf for insertions into one."""
        if self.reference_length == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


def align(reference: Sequence[object], hypothesis: Sequence[object]) -> ErrorCounts:
    """Minimum-edit alignment of two sequences, with its substitutions, deletions, insertions.

    Among alignments of minimal total cost, ties are broken towards substitutions, then
    deletions (the total, and so every rate, does not depend on the tie-break).

    Args:
        reference: the reference units.
        hypothesis: the hypothesis units.
    """
    n, m = len(reference), len(hypothesis)
    # cost[j], ops[j] for row i: (total, substitutions, deletions, insertions)
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)]
        r = reference[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1]
            if r == hypothesis[j - 1]:
                best = diag
            else:
                best = (diag[0] + 1, diag[1] + 1, diag[2], diag[3])
            up = prev[j]  # reference unit deleted
            if up[0] + 1 < best[0]:
                best = (up[0] + 1, up[1], up[2] + 1, up[3])
            left = cur[j - 1]  # hypothesis unit inserted
            if left[0] + 1 < best[0]:
                best = (left[0] + 1, left[1], left[2], left[3] + 1)
            cur.append(best)
        prev = cur
    _, s, d, ins = prev[m]
    return ErrorCounts(substitutions=s, deletions=d, insertions=ins, reference_length=n)


def edit_distance(reference: Sequence[object], hypothesis: Sequence[object]) -> int:
    """Levenshtein distance (unit costs)."""
    return align(reference, hypothesis).errors


def _chars(text: str) -> list[str]:
    return list(" ".join(text.split()))


def word_errors(references: Iterable[str], hypotheses: Iterable[str]) -> ErrorCounts:
    """Word edit operations summed over utterance pairs."""
    counts = ErrorCounts()
    for ref, hyp in _pairs(references, hypotheses):
        counts = counts + align(ref.split(), hyp.split())
    return counts


def char_errors(references: Iterable[str], hypotheses: Iterable[str]) -> ErrorCounts:
    """Character edit operations summed over utterance pairs (spaces between words count)."""
    counts = ErrorCounts()
    for ref, hyp in _pairs(references, hypotheses):
        counts = counts + align(_chars(ref), _chars(hyp))
    return counts


def wer(references: Iterable[str] | str, hypotheses: Iterable[str] | str) -> float:
    """Corpus word error rate (a single string is one utterance)."""
    return word_errors(_as_list(references), _as_list(hypotheses)).rate


def cer(references: Iterable[str] | str, hypotheses: Iterable[str] | str) -> float:
    """Corpus character error rate (a single string is one utterance)."""
    return char_errors(_as_list(references), _as_list(hypotheses)).rate


def _as_list(texts: Iterable[str] | str) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _pairs(references: Iterable[str], hypotheses: Iterable[str]) -> list[tuple[str, str]]:
    refs, hyps = list(references), list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(
            f"`hypotheses` must have one entry per reference ({len(refs)}), but has {len(hyps)} instead."
        )
    return list(zip(refs, hyps))
