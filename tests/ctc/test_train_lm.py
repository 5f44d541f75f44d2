"""``speechvq train-lm``: word and character n-gram models written as ARPA."""

from __future__ import annotations

import pytest

from speechvq.cli import main
from speechvq.text import ArpaLM, train_ngram


def test_train_lm_writes_the_word_model_train_ngram_builds(tmp_path, capsys):
    lines = ["THE CAT SAT", "THE DOG", "", "A CAT SAT DOWN"]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    assert (
        main(["train-lm", str(tmp_path / "text.txt"), "--order", "2", "--out", str(tmp_path / "lm.arpa")])
        == 0
    )
    assert "3 sentences, 9 words" in capsys.readouterr().out
    loaded = ArpaLM.load(tmp_path / "lm.arpa")
    expected = train_ngram([line.split() for line in lines if line], order=2)
    assert loaded.order == 2 and loaded.words == expected.words
    for sentence in (["THE", "CAT"], ["A", "DOG", "SAT"], ["ZEBRA"]):
        assert loaded.sentence_log10(sentence) == pytest.approx(expected.sentence_log10(sentence), abs=1e-5)


def test_train_lm_char_units_are_letters_with_bars_between_words(tmp_path):
    (tmp_path / "train.ltr").write_text("T H E | C A T |\n")
    (tmp_path / "train.wrd").write_text("THE CAT\n")
    for name in ("train.ltr", "train.wrd"):  # letters files and word files read the same
        out = tmp_path / f"{name}.arpa"
        assert (
            main(["train-lm", str(tmp_path / name), "--unit", "char", "--order", "3", "--out", str(out)]) == 0
        )
        lm = ArpaLM.load(out, unit="char")
        assert lm.words == ["A", "C", "E", "H", "T", "|"]
        assert ("H", "E", "|") in lm.ngrams[3] and ("T", "|", "C") not in lm.ngrams[3]


def test_train_lm_exits_2_naming_the_problem(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n \n")
    assert main(["train-lm", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "lm.arpa")]) == 2
    assert "blank.txt: holds no sentence" in capsys.readouterr().err
    assert main(["train-lm", str(tmp_path / "none.txt"), "--out", str(tmp_path / "lm.arpa")]) == 2
    assert "none.txt: text file does not exist" in capsys.readouterr().err
    assert main(["train-lm", str(tmp_path / "blank.txt"), "--order", "0", "--out", str(tmp_path / "x")]) == 2
