"""CTC output vocabularies: letters with ``|`` between words, or sentencepiece pieces.

The layout is the one transformers' ``Wav2Vec2CTCTokenizer`` reads, so that an exported model
decodes to the same text:

* ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; ``<pad>`` is the CTC blank (transformers'
  ``pad_token_id``), ``<s>``/``</s>`` are never targets (kept so that the layout equals the
  released fairseq-converted checkpoints), ``<unk>`` stands for any unit not in the vocabulary;
* id 4 is ``|``, the word delimiter, decoded as a space;
* then the units: single characters (``kind="letters"``, fairseq's ``.ltr`` labels), or
  sentencepiece pieces with their word-start mark ``▁`` removed (``kind="sentencepiece"``):
  words are separated by ``|`` in both kinds, so decoding is the same plain concatenation.

Decoding follows ``Wav2Vec2CTCTokenizer.decode``: merge repeated ids, drop the blank, map ``|``
to a space, join and strip.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

from speechvq.errors import UserInputError
from speechvq.files import read_json

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
WORD_DELIMITER = "|"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
SPM_WORD_START = "\u2581"  # sentencepiece's "▁"
VOCAB_NAME = "vocab.json"


@dataclass
class Vocabulary:
    """Token inventory of a CTC model; index = output unit.

    Build it with :meth:`letters`, :meth:`from_ltr`, :meth:`train_sentencepiece` or
    :meth:`from_dict`.
    """

    tokens: list[str]
    """Token of every output unit, in id order (``tokens[0]`` is ``<pad>``, the blank)."""
    kind: Literal["letters", "sentencepiece"] = "letters"
    """How text is split into tokens."""
    sentencepiece_model: bytes | None = field(default=None, repr=False)
    """The serialized sentencepiece model (``kind="sentencepiece"`` only)."""

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or len(self.tokens) < 5:
            raise ValueError(
                f"`tokens` must start with {[*SPECIAL_TOKENS, WORD_DELIMITER]}, "
                f"but starts with {self.tokens[:5]} instead."
            )
        if self.tokens[4] != WORD_DELIMITER:
            raise ValueError(f"`tokens[4]` must be {WORD_DELIMITER!r}, but is {self.tokens[4]!r} instead.")
        if len(set(self.tokens)) != len(self.tokens):
            dup = [t for t, n in Counter(self.tokens).items() if n > 1]
            raise ValueError(f"`tokens` must be unique, but repeats {dup[:5]} instead.")
        if self.kind not in ("letters", "sentencepiece"):
            raise ValueError(f"`kind` must be 'letters' or 'sentencepiece', but is {self.kind!r} instead.")
        if self.kind == "sentencepiece" and self.sentencepiece_model is None:
            raise ValueError(
                "`sentencepiece_model` must be given for kind='sentencepiece', but is None instead."
            )
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._spm: Any = None

    # -- ids --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def blank_id(self) -> int:
        """The CTC blank, ``<pad>`` (0)."""
        return self._index[PAD]

    @property
    def unk_id(self) -> int:
        return self._index[UNK]

    @property
    def word_delimiter_id(self) -> int:
        return self._index[WORD_DELIMITER]

    def token_to_id(self, token: str) -> int:
        """Id of ``token``; ``<unk>``'s for a token outside the vocabulary."""
        return self._index.get(token, self.unk_id)

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Target ids of a transcript (words separated by whitespace).

        Words are joined by ``|`` (none before the first or after the last word); letters map
        one character to one id, sentencepiece splits each word into pieces.
        """
        ids: list[int] = []
        for k, word in enumerate(text.split()):
            if k:
                ids.append(self.word_delimiter_id)
            ids.extend(self.token_to_id(t) for t in self._split_word(word))
        return ids

    def encode_ltr(self, line: str) -> list[int]:
        """Target ids of a fairseq ``.ltr`` line (space-separated tokens, ``|`` ends each word)."""
        return [self.token_to_id(t) for t in line.split()]

    def _split_word(self, word: str) -> list[str]:
        if self.kind == "letters":
            return list(word)
        pieces = self._sentencepiece().encode(word, out_type=str)
        return [p for p in (piece.lstrip(SPM_WORD_START) for piece in pieces) if p]

    def _sentencepiece(self) -> Any:
        if self._spm is None:
            import sentencepiece as spm

            self._spm = spm.SentencePieceProcessor(model_proto=self.sentencepiece_model)
        return self._spm

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], *, group: bool = True) -> str:
        """Text of CTC output ids, exactly as ``Wav2Vec2CTCTokenizer.decode`` makes it.

        Args:
            ids: frame-level ids (e.g. the argmax path), or an already collapsed sequence.
            group: merge runs of equal ids first (CTC collapsing); False for collapsed input.

        Returns:
            The text: blanks dropped, ``|`` as a space, surrounding whitespace stripped.
        """
        ids = [int(i) for i in ids]
        if group:
            ids = [key for key, _ in groupby(ids)]
        pieces = []
        for i in ids:
            token = self.tokens[i] if 0 <= i < len(self.tokens) else UNK
            if token == PAD:
                continue
            pieces.append(" " if token == WORD_DELIMITER else token)
        return "".join(pieces).strip()

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def letters(cls, transcripts: Iterable[str], *, min_count: int = 1) -> Vocabulary:
        """A letter vocabulary of every character in ``transcripts`` (words text, e.g. ``.wrd``).

        Args:
            transcripts: one utterance per item; whitespace separates words.
            min_count: characters seen fewer times map to ``<unk>``.
        """
        counts: Counter[str] = Counter()
        for text in transcripts:
            counts.update(ch for ch in text if not ch.isspace())
        return cls._from_counts(counts, min_count)

    @classmethod
    def from_ltr(cls, lines: Iterable[str], *, min_count: int = 1) -> Vocabulary:
        """A letter vocabulary of every token in fairseq ``.ltr`` lines."""
        counts: Counter[str] = Counter()
        for line in lines:
            counts.update(line.split())
        return cls._from_counts(counts, min_count)

    @classmethod
    def _from_counts(cls, counts: Counter[str], min_count: int) -> Vocabulary:
        reserved = set(SPECIAL_TOKENS) | {WORD_DELIMITER}
        units = sorted(t for t, n in counts.items() if n >= min_count and t not in reserved)
        return cls([*SPECIAL_TOKENS, WORD_DELIMITER, *units], kind="letters")

    @classmethod
    def train_sentencepiece(
        cls,
        transcripts: Iterable[str],
        vocab_size: int,
        *,
        model_type: Literal["unigram", "bpe"] = "unigram",
        character_coverage: float = 1.0,
        seed: int = 0,
    ) -> Vocabulary:
        """Train a sentencepiece model on ``transcripts`` and build its CTC vocabulary.

        Args:
            transcripts: one utterance per item (words text).
            vocab_size: sentencepiece's vocabulary size (an upper bound: ``hard_vocab_limit`` is
                off, so a small corpus yields fewer pieces). The CTC vocabulary adds the 5 fixed
                tokens and merges pieces that differ only in the word-start mark.
            model_type: ``unigram`` or ``bpe``.
            character_coverage: fraction of characters covered by the model.
            seed: sentencepiece's random seed.

        Raises:
            UserInputError: if sentencepiece cannot train on the transcripts.
        """
        import sentencepiece as spm

        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"`model_type` must be 'unigram' or 'bpe', but is {model_type!r} instead.")
        lines = [" ".join(t.split()) for t in transcripts]
        lines = [t for t in lines if t]
        if not lines:
            raise UserInputError("sentencepiece: no non-empty transcript to train on")
        buffer = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                hard_vocab_limit=False,
                bos_id=-1,
                eos_id=-1,
                unk_id=0,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise UserInputError(f"sentencepiece: cannot train on the transcripts: {err}") from None
        proto = buffer.getvalue()
        processor = spm.SentencePieceProcessor(model_proto=proto)
        reserved = set(SPECIAL_TOKENS) | {WORD_DELIMITER}
        units: list[str] = []
        for i in range(processor.get_piece_size()):
            if processor.is_unknown(i) or processor.is_control(i):
                continue
            piece = processor.id_to_piece(i).lstrip(SPM_WORD_START)
            if piece and piece not in reserved and piece not in units:
                units.append(piece)
        return cls([*SPECIAL_TOKENS, WORD_DELIMITER, *units], kind="sentencepiece", sentencepiece_model=proto)

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the sentencepiece model as base64)."""
        data: dict[str, Any] = {"kind": self.kind, "tokens": list(self.tokens)}
        if self.sentencepiece_model is not None:
            data["sentencepiece_model"] = base64.b64encode(self.sentencepiece_model).decode("ascii")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_dict`."""
        model = data.get("sentencepiece_model")
        return cls(
            list(data["tokens"]),
            kind=data.get("kind", "letters"),
            sentencepiece_model=base64.b64decode(model) if model is not None else None,
        )

    def hf_vocab(self) -> dict[str, int]:
        """The ``vocab.json`` mapping of ``Wav2Vec2CTCTokenizer`` (token -> id)."""
        return {t: i for i, t in enumerate(self.tokens)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(
            json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a file written by :meth:`save`, or a transformers ``vocab.json`` (token -> id).

        Raises:
            UserInputError: naming the file, for a missing or malformed file.
        """
        path = Path(path)
        if not path.exists():
            raise UserInputError(f"{path}: vocabulary file does not exist")
        data = read_json(path, "JSON vocabulary", expect=None)
        try:
            if isinstance(data, dict) and "tokens" in data:
                return cls.from_dict(data)
            if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
                ordered = sorted(data.items(), key=lambda kv: kv[1])
                if [i for _, i in ordered] != list(range(len(ordered))):
                    raise ValueError("ids must be 0..V-1")
                return cls([t for t, _ in ordered], kind="letters")
        except (ValueError, KeyError, TypeError) as err:
            raise UserInputError(f"{path}: invalid vocabulary: {err}") from None
        raise UserInputError(
            f"{path}: invalid vocabulary: expected {{'tokens': [...]}} or a token -> id mapping"
        )
