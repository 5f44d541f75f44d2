"""Vocabulary: transformers' CTC token layout, letters and sentencepiece, encoding and decoding."""

from __future__ import annotations

import json

import pytest

from speechvq.errors import UserInputError
from speechvq.text import SPECIAL_TOKENS, Vocabulary


def test_letters_vocabulary_has_the_transformers_ctc_layout():
    vocab = Vocabulary.letters(["HELLO WORLD", "HOLD"])
    assert vocab.tokens == ["<pad>", "<s>", "</s>", "<unk>", "|", "D", "E", "H", "L", "O", "R", "W"]
    assert (vocab.blank_id, vocab.unk_id, vocab.word_delimiter_id) == (0, 3, 4)


def test_letters_encode_joins_words_with_the_delimiter():
    vocab = Vocabulary.letters(["AB C"])
    a, b, c = (vocab.token_to_id(t) for t in "ABC")
    assert vocab.encode("  AB   C ") == [a, b, 4, c]
    assert vocab.encode("AXB") == [a, vocab.unk_id, b]
    assert vocab.encode("") == []


def test_encode_ltr_reads_fairseq_letter_lines():
    vocab = Vocabulary.from_ltr(["H I | T H E R E |"])
    assert vocab.tokens[5:] == ["E", "H", "I", "R", "T"]
    assert vocab.encode_ltr("H I |") == [6, 7, 4]


def test_decode_merges_repeats_drops_blanks_and_maps_the_delimiter_to_a_space():
    vocab = Vocabulary.letters(["AB"])
    a, b = vocab.token_to_id("A"), vocab.token_to_id("B")
    # frames: A A _ A | | B _ B B |  ->  "AA BB"
    path = [a, a, 0, a, 4, 4, b, 0, b, b, 4]
    assert vocab.decode(path) == "AA BB"
    assert vocab.decode([a, a, 4, b], group=False) == "AA B"
    assert vocab.decode([4, 0, 4]) == ""
    assert vocab.decode([a, 4, 0, 4, b]) == "A  B"  # as transformers: two delimiters, two spaces
    assert vocab.decode([3, 1]) == "<unk><s>"


def test_min_count_sends_rare_letters_to_unk():
    vocab = Vocabulary.letters(["AAB"], min_count=2)
    assert "B" not in vocab.tokens
    assert vocab.encode("B") == [vocab.unk_id]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_vocabulary_round_trips_text(model_type):
    texts = ["THE CAT SAT ON THE MAT", "A DOG SAT ON A LOG", "THE DOG AND THE CAT RAN"] * 4
    vocab = Vocabulary.train_sentencepiece(texts, vocab_size=40, model_type=model_type)
    assert vocab.kind == "sentencepiece" and tuple(vocab.tokens[:4]) == SPECIAL_TOKENS
    assert not any("\u2581" in t for t in vocab.tokens)
    for text in texts[:3]:
        ids = vocab.encode(text)
        assert vocab.unk_id not in ids
        assert vocab.decode(ids, group=False) == text
    assert len(vocab.encode("THE CAT")) < len("THE CAT")  # pieces longer than letters exist


def test_vocabulary_save_and_load_round_trip(tmp_path):
    texts = ["ONE TWO THREE", "TWO THREE FOUR"] * 3
    for vocab in (Vocabulary.letters(texts), Vocabulary.train_sentencepiece(texts, vocab_size=25)):
        vocab.save(tmp_path / "v.json")
        loaded = Vocabulary.load(tmp_path / "v.json")
        assert loaded.tokens == vocab.tokens and loaded.kind == vocab.kind
        assert loaded.encode("TWO THREE") == vocab.encode("TWO THREE")


def test_vocabulary_loads_a_transformers_vocab_json(tmp_path):
    vocab = Vocabulary.letters(["AB"])
    (tmp_path / "vocab.json").write_text(json.dumps(vocab.hf_vocab()))
    assert Vocabulary.load(tmp_path / "vocab.json").tokens == vocab.tokens


def test_vocabulary_load_raises_user_input_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserInputError, match=r"bad\.json"):
        Vocabulary.load(bad)
    with pytest.raises(UserInputError, match="does not exist"):
        Vocabulary.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(UserInputError, match="invalid vocabulary"):
        Vocabulary.load(bad)


def test_vocabulary_raises_when_the_layout_is_wrong():
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["<unk>", "<pad>", "<s>", "</s>", "|", "A"])
    with pytest.raises(ValueError, match="unique"):
        Vocabulary([*SPECIAL_TOKENS, "|", "A", "A"])
