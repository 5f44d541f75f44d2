"""Unit vocabularies: fairseq ``dict.txt`` dictionaries and sentencepiece acoustic BPE over units.

``dict.txt`` (fairseq ``Dictionary``), documented once: one ``symbol count`` line per symbol, most
frequent first, without the special symbols. In memory the ids are ``<s>=0, <pad>=1, </s>=2,
<unk>=3`` (fairseq's order), then the file's symbols in file order, then ``<mask>`` (added last,
as fairseq's masked LM task does).

Acoustic BPE: every base unit (a ``dict.txt`` symbol such as ``17`` or ``3-250``) is written as
one unicode character (``chr(UNIT_CHAR_BASE + index)``), an utterance becomes a string of such
characters without spaces, and a sentencepiece BPE model learns merges over those strings; its
pieces are then the BERT tokens, each standing for one or more consecutive units.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from speechvq.errors import UserInputError
from speechvq.files import read_text

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MASK = "<mask>"
UNIT_CHAR_BASE = 0x4E00
"""First code point of the unit characters (CJK ideographs: single characters to sentencepiece,
never whitespace or punctuation)."""
MAX_UNIT_CHARS = 0x9FFF - UNIT_CHAR_BASE + 1


class UnitDictionary:
    """Symbol <-> id mapping in fairseq's layout (see the module docstring).

    Args:
        symbols: the non-special symbols, in id order.
        counts: their corpus counts (written to ``dict.txt``).
    """

    def __init__(self, symbols: Sequence[str], counts: Sequence[int] | None = None) -> None:
        self.symbols = [*SPECIALS, *symbols, MASK]
        self.counts = [0] * len(SPECIALS) + list(counts if counts is not None else [0] * len(symbols)) + [0]
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise ValueError("`symbols` must be distinct and must not contain special symbols.")

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    @property
    def mask_id(self) -> int:
        return len(self.symbols) - 1

    @property
    def first_unit_id(self) -> int:
        """Id of the first non-special symbol (random replacements are drawn from
        ``[first_unit_id, mask_id)``)."""
        return len(SPECIALS)

    @property
    def num_units(self) -> int:
        """Non-special symbols."""
        return len(self.symbols) - len(SPECIALS) - 1

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, tokens: Iterable[str], add_specials: bool = True) -> np.ndarray:
        """``[N]`` int64 ids (unknown symbols -> ``<unk>``), framed by ``<s> ... </s>`` if asked."""
        ids = [self.index.get(t, self.unk_id) for t in tokens]
        if add_specials:
            ids = [self.bos_id, *ids, self.eos_id]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.symbols[int(i)] for i in ids]

    @classmethod
    def build(cls, corpus: Iterable[Sequence[str]]) -> UnitDictionary:
        """The dictionary of a tokenised corpus: symbols by descending count, ties by name."""
        counter: Counter[str] = Counter()
        for tokens in corpus:
            counter.update(tokens)
        ordered = sorted(counter.items(), key=lambda kv: (-kv[1], _natural_key(kv[0])))
        bad = [s for s, _ in ordered if s in SPECIALS or s == MASK]
        if bad:
            raise UserInputError(f"unit symbols must not be special symbols, but found {bad[0]!r}")
        return cls([s for s, _ in ordered], [c for _, c in ordered])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``dict.txt`` (non-special symbols only)."""
        lines = [f"{s} {c}\n" for s, c in zip(self.symbols, self.counts) if s not in SPECIALS and s != MASK]
        Path(path).write_text("".join(lines), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UnitDictionary:
        """Read a fairseq ``dict.txt``."""
        path = Path(path)
        if not path.exists():
            raise UserInputError(f"{path}: dictionary file does not exist")
        lines = read_text(path, "dictionary file", max_bytes=None).splitlines()
        symbols, counts = [], []
        for lineno, line in enumerate(lines, start=1):
            fields = line.rsplit(" ", 1)
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise UserInputError(f"{path}:{lineno}: expected 'symbol count', but found {line!r}")
            symbols.append(fields[0])
            counts.append(int(fields[1]))
        try:
            return cls(symbols, counts)
        except ValueError:
            raise UserInputError(f"{path}: repeated or special symbols") from None


def _natural_key(symbol: str) -> tuple[int, ...] | tuple[float, str]:
    parts = symbol.split("-")
    if all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return (float("inf"), symbol)


class UnitBpe:
    """Sentencepiece BPE over unit strings.

    Args:
        model_file: a trained sentencepiece model (see :meth:`train`).
        base: the base unit dictionary that maps units to characters.
    """

    def __init__(self, model_file: str | os.PathLike[str], base: UnitDictionary) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.base = base
        self.processor = spm.SentencePieceProcessor(model_file=str(model_file))

    def to_chars(self, units: Sequence[str]) -> str:
        """One character per unit (``<unk>`` for units unknown to the base dictionary)."""
        return "".join(chr(UNIT_CHAR_BASE + self.base.index.get(u, self.base.unk_id)) for u in units)

    def encode(self, units: Sequence[str]) -> list[str]:
        """The BPE pieces of a unit sequence."""
        if not units:
            return []
        return list(self.processor.encode(self.to_chars(units), out_type=str))

    @staticmethod
    def piece_lengths(pieces: Sequence[str]) -> list[int]:
        """Units each piece stands for."""
        return [len(p) for p in pieces]

    @classmethod
    def train(
        cls, corpus: Iterable[Sequence[str]], base: UnitDictionary, vocab_size: int, model_prefix: str | Path
    ) -> UnitBpe:
        """Learn a BPE model of ``vocab_size`` pieces over ``corpus`` -> ``model_prefix.model``."""
        import sentencepiece as spm

        if len(base) > MAX_UNIT_CHARS:
            raise UserInputError(
                f"acoustic BPE supports at most {MAX_UNIT_CHARS} units, but there are {len(base)}"
            )
        prefix = Path(model_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        text_path = prefix.with_suffix(".chars.txt")
        writer = cls.__new__(cls)
        writer.base = base
        with open(text_path, "w", encoding="utf-8") as f:
            for units in corpus:
                if units:
                    f.write(writer.to_chars(units) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text_path),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            add_dummy_prefix=False,
            split_by_unicode_script=False,
            split_by_number=False,
            max_sentence_length=1 << 20,
            max_sentencepiece_length=16,
            hard_vocab_limit=False,
            bos_id=-1,
            eos_id=-1,
            minloglevel=2,
        )
        text_path.unlink()
        return cls(f"{prefix}.model", base)
