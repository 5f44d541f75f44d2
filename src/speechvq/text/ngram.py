"""Language models for CTC beam search: a pure-Python ARPA back-off n-gram model and a trainer.

Every scorer implements :class:`LanguageModel`: it reads *units* (words, or characters/tokens
for a character LM) left to right and returns natural-log probabilities. The ARPA format is the
one KenLM's ``lmplz`` writes, so a KenLM model can be used here without KenLM, and a model
trained by :func:`train_ngram` can be used by KenLM (``build_binary``).

The trainer uses interpolated Witten-Bell smoothing, which an ARPA file represents exactly: a
seen n-gram stores its interpolated probability, a context its interpolation weight as the
back-off weight. The unigram level interpolates with a uniform distribution over the seen units
plus ``<unk>``.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from speechvq.errors import UserInputError
from speechvq.files import write_atomic
from speechvq.text.files import read_text_lines

LN10 = math.log(10.0)
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
_NO_PROB = -99.0  # log10 "probability" of <s>, which is only ever a context


class LanguageModel(Protocol):
    """Left-to-right scorer over units. States are opaque and only passed back in."""

    unit: Literal["word", "char"]
    """``word``: scored once per completed word; ``char``: once per emitted vocabulary token
    (``|`` between words)."""

    def begin(self) -> Any:
        """The state at the start of a sentence (after ``<s>``)."""
        ...

    def score(self, state: Any, unit: str) -> tuple[float, Any]:
        """(ln P(unit | state), the state after ``unit``)."""
        ...

    def end(self, state: Any) -> float:
        """ln P(``</s>`` | state)."""
        ...

    def unigram(self, unit: str) -> float:
        """ln P(unit) with no context (the look-ahead of :class:`speechvq.decoding.Lexicon`)."""
        ...


class ArpaLM:
    """Back-off n-gram model read from an ARPA file (log10 probabilities and back-off weights).

    Args:
        ngrams: per order (1-based), a map from the n-gram tuple to (log10 prob, log10 back-off).
        unit: what the units are (see :class:`LanguageModel`).
    """

    def __init__(
        self,
        ngrams: dict[int, dict[tuple[str, ...], tuple[float, float]]],
        unit: Literal["word", "char"] = "word",
    ) -> None:
        if not ngrams.get(1):
            raise ValueError("`ngrams` must hold unigrams, but has none instead.")
        self.ngrams = ngrams
        self.order = max(ngrams)
        self.unit = unit
        unk = ngrams[1].get((UNK,))
        self._unk_log10 = unk[0] if unk is not None else _NO_PROB

    @property
    def vocabulary(self) -> set[str]:
        return {g[0] for g in self.ngrams[1]}

    @property
    def words(self) -> list[str]:
        """The units the model knows, without ``<s>``, ``</s>`` and ``<unk>``, sorted."""
        return sorted(self.vocabulary - {BOS, EOS, UNK})

    def log10_prob(self, context: Sequence[str], unit: str) -> float:
        """log10 P(unit | context) with back-off; context is the preceding units (oldest first)."""
        context = tuple(context)[-(self.order - 1) :] if self.order > 1 else ()
        if (unit,) not in self.ngrams[1]:
            unit = UNK
        backoff = 0.0
        for start in range(len(context) + 1):
            hist = context[start:]
            entry = self.ngrams.get(len(hist) + 1, {}).get((*hist, unit))
            if entry is not None:
                return backoff + entry[0]
            ctx_entry = self.ngrams.get(len(hist), {}).get(hist) if hist else None
            if ctx_entry is not None:
                backoff += ctx_entry[1]
        return backoff + self._unk_log10

    def _trim(self, context: tuple[str, ...]) -> tuple[str, ...]:
        """The longest suffix of ``context`` that is itself an n-gram (shorter ones score equally)."""
        context = context[-(self.order - 1) :] if self.order > 1 else ()
        while context and context not in self.ngrams.get(len(context), {}):
            context = context[1:]
        return context

    def begin(self) -> tuple[str, ...]:
        return self._trim((BOS,))

    def score(self, state: tuple[str, ...], unit: str) -> tuple[float, tuple[str, ...]]:
        word = unit if (unit,) in self.ngrams[1] else UNK
        return self.log10_prob(state, unit) * LN10, self._trim((*state, word))

    def end(self, state: tuple[str, ...]) -> float:
        return self.log10_prob(state, EOS) * LN10

    def unigram(self, unit: str) -> float:
        return self.log10_prob((), unit) * LN10

    def sentence_log10(self, units: Sequence[str]) -> float:
        """log10 P(units, ``</s>``) given ``<s>``."""
        state, total = self.begin(), 0.0
        for u in units:
            s, state = self.score(state, u)
            total += s
        return (total + self.end(state)) / LN10

    # -- ARPA I/O ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], unit: Literal["word", "char"] = "word") -> ArpaLM:
        """Read an ARPA file.

        Raises:
            UserInputError: naming the file and line for a malformed file.
        """
        path = Path(path)
        lines = read_text_lines(
            path, "language model file", "not a text ARPA file (binary KenLM models need the kenlm package)"
        )
        ngrams: dict[int, dict[tuple[str, ...], tuple[float, float]]] = {}
        order = 0
        for lineno, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                try:
                    order = int(line[1:].split("-")[0])
                except ValueError:
                    raise UserInputError(f"{path}:{lineno}: bad section header {line!r}") from None
                ngrams[order] = {}
                continue
            if order == 0:
                continue
            fields = line.split()
            try:
                logp = float(fields[0])
                words = tuple(fields[1 : 1 + order])
                bow = float(fields[1 + order]) if len(fields) > 1 + order else 0.0
            except (ValueError, IndexError):
                raise UserInputError(f"{path}:{lineno}: malformed {order}-gram line {line!r}") from None
            if len(words) != order:
                raise UserInputError(f"{path}:{lineno}: expected {order} words in {line!r}")
            ngrams[order][words] = (logp, bow)
        if not ngrams.get(1):
            raise UserInputError(f"{path}: no \\1-grams: section; not an ARPA file")
        return cls(ngrams, unit)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model as an ARPA file."""
        out = ["", "\\data\\"]
        out += [f"ngram {n}={len(self.ngrams[n])}" for n in sorted(self.ngrams)]
        for n in sorted(self.ngrams):
            out += ["", f"\\{n}-grams:"]
            for words, (logp, bow) in sorted(self.ngrams[n].items()):
                line = f"{logp:.6f}\t{' '.join(words)}"
                if n < self.order:
                    line += f"\t{bow:.6f}"
                out.append(line)
        out += ["", "\\end\\", ""]
        write_atomic(path, "\n".join(out))


def train_ngram(
    sentences: Iterable[Sequence[str]], order: int = 3, unit: Literal["word", "char"] = "word"
) -> ArpaLM:
    """Train an interpolated Witten-Bell n-gram model.

    Args:
        sentences: each a sequence of units (``text.split()`` for words; the vocabulary tokens,
            ``|`` between words, for a character LM).
        order: n.
        unit: recorded on the model (see :class:`LanguageModel`).

    Returns:
        The model; :meth:`ArpaLM.save` writes it as ARPA.
    """
    if order < 1:
        raise ValueError(f"`order` must be >= 1, but is {order} instead.")
    counts: dict[int, Counter[tuple[str, ...]]] = defaultdict(Counter)
    for sentence in sentences:
        padded = [BOS, *sentence, EOS]  # a single <s>: sentence starts share one context
        for i in range(1, len(padded)):
            for n in range(1, min(order, i + 1) + 1):
                counts[n][tuple(padded[i - n + 1 : i + 1])] += 1
    if not counts[1]:
        raise ValueError("`sentences` must hold at least one sentence, but is empty instead.")

    # followers per context: total count c(h) and distinct followers T(h)
    context_total: dict[tuple[str, ...], int] = Counter()
    context_types: dict[tuple[str, ...], int] = Counter()
    for n in range(1, order + 1):
        for gram, c in counts[n].items():
            context_total[gram[:-1]] += c
            context_types[gram[:-1]] += 1

    vocab_size = len(counts[1]) + 1  # + <unk>
    probs: dict[tuple[str, ...], float] = {}
    total, types = context_total[()], context_types[()]
    for (w,), c in counts[1].items():
        probs[(w,)] = (c + types / vocab_size) / (total + types)
    unk_prob = (types / vocab_size) / (total + types)
    for n in range(2, order + 1):
        for gram, c in counts[n].items():
            hist = gram[:-1]
            lower = probs[gram[1:]]
            probs[gram] = (c + context_types[hist] * lower) / (context_total[hist] + context_types[hist])

    def backoff(gram: tuple[str, ...]) -> float:
        t = context_types.get(gram, 0)
        return math.log10(t / (context_total[gram] + t)) if t else 0.0

    ngrams: dict[int, dict[tuple[str, ...], tuple[float, float]]] = {n: {} for n in range(1, order + 1)}
    for gram, p in probs.items():
        ngrams[len(gram)][gram] = (math.log10(p), backoff(gram))
    ngrams[1][(UNK,)] = (math.log10(unk_prob), 0.0)
    ngrams[1][(BOS,)] = (_NO_PROB, backoff((BOS,)))
    return ArpaLM(ngrams, unit)


class KenLMScorer:
    """A KenLM model (ARPA or binary) as a :class:`LanguageModel`; needs the ``kenlm`` package
    (the ``[lm]`` extra)."""

    def __init__(self, path: str | os.PathLike[str], unit: Literal["word", "char"] = "word") -> None:
        try:
            import kenlm
        except ImportError:
            raise UserInputError(
                "binary KenLM models need the kenlm package: pip install 'speechvq[lm]' (or use an ARPA file)"
            ) from None
        if not Path(path).is_file():
            raise UserInputError(f"{path}: language model file does not exist")
        self._kenlm = kenlm
        self.model = kenlm.Model(str(path))
        self.unit = unit

    def begin(self) -> Hashable:
        state = self._kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def score(self, state: Any, unit: str) -> tuple[float, Any]:
        out = self._kenlm.State()
        return self.model.BaseScore(state, unit, out) * LN10, out

    def end(self, state: Any) -> float:
        out = self._kenlm.State()
        return self.model.BaseScore(state, EOS, out) * LN10

    def unigram(self, unit: str) -> float:
        return self.model.score(unit, bos=False, eos=False) * LN10


def load_language_model(
    path: str | os.PathLike[str], unit: Literal["word", "char"] = "word"
) -> LanguageModel:
    """An ARPA file through :class:`ArpaLM` (pure Python), anything else through KenLM."""
    path = Path(path)
    if path.suffix.lower() == ".arpa":
        return ArpaLM.load(path, unit)
    return KenLMScorer(path, unit)
