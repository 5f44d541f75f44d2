"""The one reader of line-oriented text files: transcripts, lexicons, LM text, ARPA models."""

from __future__ import annotations

import pytest

from speechvq.data import read_labels
from speechvq.decoding import Lexicon
from speechvq.errors import UserInputError
from speechvq.text import ArpaLM
from speechvq.text.files import read_text_lines


def test_lines_split_at_newline_only(tmp_path):
    # U+2028, U+0085, form feed and a lone \r are text inside a line; str.splitlines splits at them
    body = "A\u2028B\nC\x85D\x0cE\rF\r\nG\n"
    (tmp_path / "t.txt").write_bytes(body.encode("utf-8"))
    assert read_text_lines(tmp_path / "t.txt", "text file") == ["A\u2028B", "C\x85D\x0cE\rF", "G"]


@pytest.mark.parametrize(
    ("body", "lines"),
    [(b"", []), (b"\n", [""]), (b"A", ["A"]), (b"A\n", ["A"]), (b"A\n\n", ["A", ""]), (b"\nA", ["", "A"])],
)
def test_a_final_newline_ends_the_last_line(tmp_path, body, lines):
    (tmp_path / "t.txt").write_bytes(body)
    assert read_text_lines(tmp_path / "t.txt", "text file") == lines


def test_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"ok\nok\nbad \xc3\n")
    with pytest.raises(UserInputError, match=r"t\.txt:3: lexicon is not UTF-8 text"):
        read_text_lines(tmp_path / "t.txt", "lexicon file", "lexicon is not UTF-8 text")
    with pytest.raises(UserInputError, match=r"none\.txt: lexicon file does not exist"):
        read_text_lines(tmp_path / "none.txt", "lexicon file")
    with pytest.raises(UserInputError, match=r"cannot read text file"):
        read_text_lines(tmp_path, "text file")  # a directory


def test_label_lexicon_and_arpa_readers_keep_a_line_separator_inside_a_line(tmp_path):
    # one transcript per manifest item: a U+2028 inside a transcript must not add an item
    (tmp_path / "l.wrd").write_text("HELLO\u2028WORLD\nBYE\n", encoding="utf-8")
    assert read_labels(tmp_path / "l.wrd") == ["HELLO\u2028WORLD", "BYE"]
    # the ARPA reader names the line of a bad entry by the file's own line numbers
    arpa = "\\data\\\nngram 1=2\u2028\n\n\\1-grams:\n-1.0\ta\n-1.0 c d e f\n\\end\\\n"
    (tmp_path / "lm.arpa").write_text(arpa, encoding="utf-8")
    with pytest.raises(UserInputError, match=r"lm\.arpa:6"):
        ArpaLM.load(tmp_path / "lm.arpa")
    (tmp_path / "lex.txt").write_text("hi h i |\n", encoding="utf-8")
    assert "hi" in Lexicon.load(tmp_path / "lex.txt").words
