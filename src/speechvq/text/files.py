"""Reading the line-oriented text files that speechvq takes: transcripts (``.ltr`` / ``.wrd``),
lexicons, LM text and ARPA language models."""

from __future__ import annotations

import os
from pathlib import Path

from speechvq.errors import UserInputError
from speechvq.files import path_problem


def read_text_lines(path: str | os.PathLike[str], what: str, not_text: str = "not UTF-8 text") -> list[str]:
    """The lines of a UTF-8 text file, split at ``\\n`` only.

    Only ``\\n`` ends a line (a ``\\r`` before it is dropped): ``str.splitlines`` would also split
    at characters such as U+2028 or U+0085 inside a transcript, and a label file would then no
    longer have one line per manifest item. A final ``\\n`` does not start another line.

    Args:
        path: the file.
        what: what the file is, for the error (``"lexicon file"``).
        not_text: the error's reason when a line does not decode as UTF-8.

    Raises:
        UserInputError: naming the file if it is missing or unreadable, and the file and line
            (``path:line: not_text``) for a line that is not UTF-8.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None and problem != "is a directory, not a file":
        raise UserInputError(f"{path}: {what} {problem}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{path}: {what} does not exist") from None
    except OSError as err:
        raise UserInputError(f"{path}: cannot read {what} ({err.strerror})") from None
    raws = data.split(b"\n")
    if raws[-1] == b"":  # the file ends with a newline, or is empty
        raws.pop()
    lines = []
    for lineno, raw in enumerate(raws, start=1):
        try:
            lines.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError:
            raise UserInputError(f"{path}:{lineno}: {not_text}") from None
    return lines
