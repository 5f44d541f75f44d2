"""CTC decoding: greedy (best path) and prefix beam search with an optional language model.

The beam search is pure Python (Hannun et al., 2014, "First-pass large vocabulary continuous
speech recognition using bi-directional recurrent DNNs"): every hypothesis is a collapsed prefix
with two scores, the probability of all kept alignments that end in a blank and of those that
end in the prefix's last token. A language model (any :class:`speechvq.text.LanguageModel`:
:class:`~speechvq.text.ArpaLM`, :class:`~speechvq.text.KenLMScorer`) is applied when a unit is
completed, a word at each ``|`` for a word LM, every token for a character LM, and ranks
hypotheses by ``ln P_ctc + lm_weight * ln P_lm + word_bonus * units``.

A :class:`Lexicon` restricts the search to known words, as flashlight's lexicon decoder (which
fairseq and torchaudio use) does: a prefix survives only while its unfinished word is the start of
a lexicon word, and a word ends at ``|`` only if it is one. With a word LM the lexicon also carries
the LM's unigram look-ahead: an unfinished word is ranked with the best unigram probability of the
words it can still become ("smearing"), so that finished and unfinished words compete on equal
terms; the look-ahead is replaced by the real LM score when the word ends.

pyctcdecode (the decoder transformers uses) is not supported: its releases pin ``numpy<2``.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby

import torch
from torch import Tensor

from speechvq.errors import UserInputError
from speechvq.text.files import read_text_lines
from speechvq.text.ngram import LanguageModel
from speechvq.text.vocab import Vocabulary

_NEG_INF = float("-inf")


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def greedy_paths(logits: Tensor, lengths: Tensor | None = None) -> list[list[int]]:
    """The argmax id of every valid frame.

    Args:
        logits: ``[B, T, V]`` scores (or log-probabilities).
        lengths: ``[B]`` valid frames (None: all T).

    Returns:
        One list of T_b frame ids per utterance (not collapsed).
    """
    best = logits.argmax(dim=-1).cpu()  # (B, T)
    if lengths is None:
        return [row.tolist() for row in best]
    return [row[: int(n)].tolist() for row, n in zip(best, lengths.cpu())]


def collapse(path: list[int], blank_id: int = 0) -> list[int]:
    """CTC collapsing: merge runs of equal ids, then drop blanks."""
    return [i for i, _ in groupby(path) if i != blank_id]


def greedy_decode(logits: Tensor, lengths: Tensor | None, vocab: Vocabulary) -> list[str]:
    """Best-path transcripts, decoded like ``Wav2Vec2CTCTokenizer.decode`` (see :class:`Vocabulary`).

    Args:
        logits: ``[B, T, V]``.
        lengths: ``[B]`` valid frames, or None.
        vocab: the model's vocabulary.
    """
    return [vocab.decode(path) for path in greedy_paths(logits, lengths)]


@dataclass
class Lexicon:
    """The words a beam search may write, with a unigram look-ahead for each unfinished word.

    Build it with :meth:`build` (from words and an optional word LM) or :meth:`load` (a word list
    or a flashlight/fairseq lexicon file).
    """

    words: frozenset[str]
    """The words."""
    lookahead: dict[str, float] = field(repr=False)
    """Every non-empty prefix of a word (the words included) -> the best ln P_unigram of the words
    that start with it (0.0 for all without an LM)."""

    @classmethod
    def build(cls, words: Iterable[str], lm: LanguageModel | None = None) -> Lexicon:
        """A lexicon of ``words``; with a word ``lm``, look-ahead scores from its unigrams.

        Raises:
            ValueError: if ``words`` is empty.
        """
        unique = frozenset(w for w in words if w)
        if not unique:
            raise ValueError("`words` must hold at least one word, but is empty instead.")
        scored = lm is not None and lm.unit == "word"
        lookahead: dict[str, float] = {}
        for word in unique:
            score = lm.unigram(word) if scored else 0.0  # type: ignore[union-attr]
            for end in range(1, len(word) + 1):
                prefix = word[:end]
                best = lookahead.get(prefix)
                if best is None or score > best:
                    lookahead[prefix] = score
        return cls(unique, lookahead)

    @classmethod
    def load(cls, path: str | os.PathLike[str], lm: LanguageModel | None = None) -> Lexicon:
        """Read a lexicon: one word per line, and anything after the word ignored (so flashlight's
        ``WORD W O R D |`` lexicon files read as their words).

        Raises:
            UserInputError: naming the file if it is missing or holds no word.
        """
        lines = read_text_lines(path, "lexicon file", "lexicon is not UTF-8 text")
        words = [line.split()[0] for line in lines if line.strip()]
        if not words:
            raise UserInputError(f"{path}: lexicon holds no word")
        return cls.build(words, lm)


@dataclass
class Hypothesis:
    """One result of :func:`beam_search`."""

    ids: tuple[int, ...]
    """Collapsed token ids."""
    text: str
    """Decoded text."""
    acoustic_score: float
    """ln P_ctc(prefix | audio), summed over the alignments the beam kept."""
    lm_score: float
    """ln P_lm(text, ``</s>``), unweighted (0 without a language model)."""
    score: float
    """``acoustic_score + lm_weight * lm_score + word_bonus * num_units``."""


@dataclass
class _Beam:
    """Search state of one prefix."""

    p_blank: float
    p_token: float
    lm_state: object
    lm_score: float
    units: int
    partial: str  # the current, unfinished word (word LMs and lexicons)

    @property
    def p_total(self) -> float:
        return _logaddexp(self.p_blank, self.p_token)


def beam_search(
    log_probs: Tensor,
    vocab: Vocabulary,
    *,
    beam_size: int = 16,
    lm: LanguageModel | None = None,
    lm_weight: float = 0.5,
    word_bonus: float = 0.0,
    lexicon: Lexicon | None = None,
    token_min_logp: float = -10.0,
    num_hypotheses: int = 1,
) -> list[Hypothesis]:
    """CTC prefix beam search over one utterance.

    Args:
        log_probs: ``[T, V]`` log-probabilities (log_softmax of the logits) of the valid frames.
        vocab: the model's vocabulary (blank, ``|`` and the tokens the LM reads).
        beam_size: prefixes kept after every frame.
        lm: optional language model.
        lm_weight: alpha, weight of ln P_lm.
        word_bonus: beta, added per scored LM unit (word or token); offsets the LM's preference
            for short outputs.
        lexicon: if given, only its words are written (see :class:`Lexicon`); hypotheses that
            end inside a word that is not one are dropped, unless no hypothesis is left.
        token_min_logp: tokens below this log-probability at a frame are not tried (the frame's
            best non-blank token always is); at most ``beam_size`` tokens are tried per frame.
        num_hypotheses: how many results to return.

    Returns:
        The best hypotheses, best first. With ``beam_size=1`` and no LM the result equals greedy
        decoding whenever the best path carries most of its prefix's probability (the usual, peaky
        CTC posteriors); in general a wider beam finds prefixes at least as probable as the best path.
    """
    if log_probs.ndim != 2:
        raise ValueError(
            f"`log_probs` must be 2-D [frames, vocab], but has shape {tuple(log_probs.shape)} instead."
        )
    if beam_size < 1:
        raise ValueError(f"`beam_size` must be >= 1, but is {beam_size} instead.")
    search = _PrefixSearch(vocab, lm, lm_weight, word_bonus, lexicon)
    beams: dict[tuple[int, ...], _Beam] = {(): search.root()}
    for row in log_probs.detach().float().cpu().tolist():
        candidates = _frame_candidates(row, vocab.blank_id, beam_size, token_min_logp)
        beams = dict(heapq.nlargest(beam_size, search.step(beams, row, candidates).items(), key=search.rank))
    return search.finish(beams)[:num_hypotheses]


def _frame_candidates(row: list[float], blank: int, beam_size: int, min_logp: float) -> list[int]:
    """The frame's most likely non-blank tokens above ``min_logp`` (at most ``beam_size``, and
    always the best one)."""
    ranked = heapq.nlargest(beam_size + 1, range(len(row)), key=row.__getitem__)
    candidates = [v for v in ranked if v != blank and row[v] >= min_logp][:beam_size]
    return candidates or [next(v for v in ranked if v != blank)]


class _PrefixSearch:
    """The rules of :func:`beam_search`: how a prefix grows by a token (advancing the LM over
    completed units, pruning non-words with the lexicon), how one frame updates every prefix, how
    prefixes rank, and how the final hypotheses are scored."""

    def __init__(
        self,
        vocab: Vocabulary,
        lm: LanguageModel | None,
        lm_weight: float,
        word_bonus: float,
        lexicon: Lexicon | None,
    ) -> None:
        self.vocab, self.lm, self.lm_weight, self.word_bonus, self.lexicon = (
            vocab,
            lm,
            lm_weight,
            word_bonus,
            lexicon,
        )
        self.word_lm = lm is not None and lm.unit == "word"
        self.track_words = self.word_lm or lexicon is not None
        self.prefixes = lexicon.lookahead if lexicon is not None else {}
        self.smear = self.word_lm and lexicon is not None

    def root(self) -> _Beam:
        return _Beam(0.0, _NEG_INF, self.lm.begin() if self.lm is not None else None, 0.0, 0, "")

    def extend(self, parent: _Beam, token: int) -> _Beam | None:
        """A child of ``parent`` ending in ``token``, with the LM advanced over completed units;
        None if the lexicon rules the child out."""
        lm, lexicon = self.lm, self.lexicon
        child = _Beam(_NEG_INF, _NEG_INF, parent.lm_state, parent.lm_score, parent.units, parent.partial)
        text = self.vocab.tokens[token]
        if token == self.vocab.word_delimiter_id:
            if parent.partial:
                if lexicon is not None and parent.partial not in lexicon.words:
                    return None
                if self.word_lm:
                    s, child.lm_state = lm.score(parent.lm_state, parent.partial)  # type: ignore[union-attr]
                    child.lm_score += s
                    child.units += 1
                child.partial = ""
        elif self.track_words:
            child.partial = parent.partial + text
            if lexicon is not None and child.partial not in self.prefixes:
                return None
        if lm is not None and lm.unit == "char":
            s, child.lm_state = lm.score(parent.lm_state, text)
            child.lm_score += s
            child.units += 1
        return child

    def step(
        self, beams: dict[tuple[int, ...], _Beam], row: list[float], candidates: list[int]
    ) -> dict[tuple[int, ...], _Beam]:
        """Every prefix after one more frame with log-probabilities ``row`` (before pruning)."""
        blank = self.vocab.blank_id
        new: dict[tuple[int, ...], _Beam] = {}
        for prefix, beam in beams.items():
            total = beam.p_total
            last = prefix[-1] if prefix else None
            # the prefix stays: a blank, or a repeat of the last token merged into it
            stay = new.get(prefix)
            if stay is None:
                stay = new[prefix] = _Beam(
                    _NEG_INF, _NEG_INF, beam.lm_state, beam.lm_score, beam.units, beam.partial
                )
            stay.p_blank = _logaddexp(stay.p_blank, total + row[blank])
            if last is not None:
                stay.p_token = _logaddexp(stay.p_token, beam.p_token + row[last])
            # the prefix grows by one token (a repeat needs a blank in between)
            for token in candidates:
                grown = (*prefix, token)
                child = new.get(grown)
                if child is None:
                    child = self.extend(beam, token)
                    if child is None:
                        continue
                    new[grown] = child
                source = beam.p_blank if token == last else total
                child.p_token = _logaddexp(child.p_token, source + row[token])
        return new

    def rank(self, item: tuple[tuple[int, ...], _Beam]) -> float:
        b = item[1]
        lm_score = b.lm_score + self.prefixes[b.partial] if self.smear and b.partial else b.lm_score
        return b.p_total + self.lm_weight * lm_score + self.word_bonus * b.units

    def finish(self, beams: dict[tuple[int, ...], _Beam]) -> list[Hypothesis]:
        """The hypotheses, best first, with the LM scored to the end of the utterance; those
        ending inside a non-word only when no other is left (lexicon only)."""
        results, unfinished = [], []
        for prefix, beam in beams.items():
            lm_score, units = beam.lm_score, beam.units
            if self.lm is not None:
                state = beam.lm_state
                if self.word_lm and beam.partial:
                    s, state = self.lm.score(state, beam.partial)
                    lm_score += s
                    units += 1
                lm_score += self.lm.end(state)
            score = beam.p_total + self.lm_weight * lm_score + self.word_bonus * units
            hyp = Hypothesis(prefix, self.vocab.decode(prefix, group=False), beam.p_total, lm_score, score)
            lexicon = self.lexicon
            if lexicon is not None and beam.partial and beam.partial not in lexicon.words:
                unfinished.append(hyp)
            else:
                results.append(hyp)
        results = results or unfinished
        results.sort(key=lambda h: h.score, reverse=True)
        return results


def beam_decode(
    logits: Tensor,
    lengths: Tensor | None,
    vocab: Vocabulary,
    **kwargs: object,
) -> list[str]:
    """Best beam-search transcript of every utterance of a batch.

    Args:
        logits: ``[B, T, V]`` scores (log_softmax is taken in fp32).
        lengths: ``[B]`` valid frames, or None.
        vocab: the model's vocabulary.
        **kwargs: options of :func:`beam_search`.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for b in range(log_probs.size(0)):
        n = log_probs.size(1) if lengths is None else int(lengths[b])
        out.append(beam_search(log_probs[b, :n], vocab, **kwargs)[0].text)  # type: ignore[arg-type]
    return out
