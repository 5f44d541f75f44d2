"""Reading and writing user files so that every failure is one line naming the file.

Readers check what a path is before opening it (``os.stat`` never blocks, while opening a FIFO
for reading waits for a writer), bound how much they read, and name the line of a byte that is
not UTF-8. Writers check an output path before any work is done (a directory where a file is
expected, or the reverse), write through a temporary file renamed into place, and report a full
disk as ``no space left on device: <path>``, whichever layer noticed it (the OS, torch's zip
writer, safetensors).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from speechvq.errors import UserInputError

MAX_CONFIG_BYTES = 16 << 20
"""Largest config or JSON metadata file read (16 MiB); a bigger one is refused, not read."""

NO_SPACE = "no space left on device"


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a regular file that can be opened for reading, or None if it is one.

    Only ``stat`` is called: nothing is opened, so a FIFO or a device is reported, not waited on.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a component of the path is a file)"
    except PermissionError:
        return "is not readable (permission denied)"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``Path(path)`` if it is a regular file, else :class:`UserInputError` naming it and ``what`` it is."""
    problem = path_problem(path)
    if problem is not None:
        raise UserInputError(f"{path}: {what} {problem}")
    return Path(path)


def read_bytes(path: str | os.PathLike[str], what: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``; a bigger file is refused)."""
    path = require_file(path, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1) if max_bytes is not None else fh.read()
    except OSError as err:
        raise UserInputError(f"{path}: cannot read {what} ({err.strerror})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise UserInputError(f"{path}: {what} must be at most {max_bytes} bytes, but is larger instead.")
    return data


def decode_utf8(data: bytes, path: str | os.PathLike[str], what: str) -> str:
    """``data`` as UTF-8 text, or :class:`UserInputError` naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def read_text(path: str | os.PathLike[str], what: str, *, max_bytes: int | None = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a (config or metadata) file, with one-line errors naming it.

    Raises:
        UserInputError: the file is missing, a directory, a FIFO or device, unreadable, larger than
            ``max_bytes``, or not UTF-8 (naming the line).
    """
    return decode_utf8(read_bytes(path, what, max_bytes=max_bytes), path, what)


def read_json(path: str | os.PathLike[str], what: str, *, expect: type | None = dict) -> Any:
    """The parsed JSON of a file; ``expect`` (default ``dict``) is the required top-level type.

    Raises:
        UserInputError: see :func:`read_text`; invalid JSON (naming the line); a top-level value
            of another type than ``expect``.
    """
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}:{err.lineno}: {what} is invalid JSON: {err.msg}") from None
    except RecursionError:
        raise UserInputError(f"{path}: {what} is nested too deeply to parse") from None
    if expect is not None and not isinstance(value, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise UserInputError(f"{path}: {what} must hold {kind}, but holds {type(value).__name__} instead.")
    return value


def _blocking_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a directory (so ``path`` cannot be created)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Check, before any work, that ``path`` is or can become a directory.

    Raises:
        UserInputError: ``path`` is an existing file, or one of its ancestors is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{path}: {option} must be a directory, but is an existing file instead.")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise UserInputError(f"{path}: {option} cannot be created: {blocker} is a file, not a directory")
    return path


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """Check, before any work, that ``path`` is or can become a regular file.

    Raises:
        UserInputError: ``path`` is an existing directory or not a regular file, or one of its
            ancestors is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: {option} must be a file, but is an existing directory instead.")
    if path.exists() and not path.is_file():
        raise UserInputError(f"{path}: {option} must be a regular file, but is a FIFO, socket or device.")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise UserInputError(f"{path}: {option} cannot be created: {blocker} is a file, not a directory")
    return path


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` reports a full disk (or quota): ``ENOSPC``/``EDQUOT``, or the text torch's zip
    writer (``enforce fail at inline_container.cc ... file write failed``) or safetensors raise."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    zip_writer = "inline_container" in text and "Reader" not in text  # torch.save's zip container
    return "No space left" in text or zip_writer or "file write failed" in text


def write_failure(err: BaseException, path: str | os.PathLike[str]) -> UserInputError:
    """The one-line error for a failed write of ``path``."""
    if is_disk_full(err):
        return UserInputError(f"{NO_SPACE}: {path}")
    if isinstance(err, OSError):
        return UserInputError(f"{path}: cannot write ({err.strerror or err})")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserInputError(f"{path}: cannot write ({first})")


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write inside the block into one line naming ``path`` (see :func:`write_failure`).

    Catches ``OSError`` and the ``RuntimeError``s torch and safetensors raise for a failed write.
    """
    try:
        yield
    except UserInputError:
        raise
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not is_disk_full(err):
            raise
        raise write_failure(err, path) from err
    except Exception as err:  # safetensors' SafetensorError is not a RuntimeError
        if type(err).__name__ == "SafetensorError":
            raise write_failure(err, path) from err
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory (so that a rename inside it is durable); a no-op where not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync'ed and renamed
    into place: a reader (or a later run after a kill) sees the old content or the new, never a part.

    Raises:
        UserInputError: the write failed (``no space left on device: <path>`` for a full disk);
            the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)
    return path
