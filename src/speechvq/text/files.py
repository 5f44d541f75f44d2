"""Reading the text files that decoding and LM training take (LMs, lexicons, LM text)."""

from __future__ import annotations

import os
from pathlib import Path

from speechvq.errors import UserInputError


def read_text_lines(path: str | os.PathLike[str], what: str, not_text: str = "not UTF-8 text") -> list[str]:
    """The lines of a UTF-8 text file.

    Args:
        path: the file.
        what: what the file is, for the error (``"lexicon file"``).
        not_text: the error's reason when the file does not decode as UTF-8.

    Raises:
        UserInputError: naming the file if it is missing or not text.
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserInputError(f"{path}: {what} does not exist") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: {not_text}") from None
