"""fairseq-compatible manifests and label files.

A manifest is a TSV file: the first line is the root directory, every further line is
``relpath<TAB>num_samples`` (the path relative to the root, the length in samples at the file's
own rate). Label files sit beside it, one line per manifest item, in the same order:
``.wrd`` holds the words of an utterance, ``.ltr`` its letters separated by spaces with ``|``
after every word (fairseq's letter format, e.g. ``H E L L O | W O R L D |``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from speechvq.errors import UserInputError
from speechvq.files import path_problem, write_atomic
from speechvq.text.files import read_text_lines


@dataclass
class ManifestItem:
    """One line of a manifest."""

    relpath: str
    """Audio path relative to the manifest root."""
    num_samples: int
    """Length in samples at the file's own sample rate, as listed."""
    line: int
    """1-based line number in the manifest file (0 for items not read from a file)."""


@dataclass
class Manifest:
    """A parsed manifest: a root directory and its items."""

    root: Path
    """Directory the item paths are relative to."""
    items: list[ManifestItem]
    """The items, in file order."""
    path: Path | None = None
    """The manifest file this was read from, if any."""

    def audio_path(self, item: ManifestItem) -> Path:
        """Absolute path of an item's audio file."""
        return self.root / item.relpath

    def __len__(self) -> int:
        return len(self.items)


def parse_manifest(path: str | os.PathLike) -> tuple[Manifest, list[str]]:
    """Read a fairseq manifest leniently: the good lines, and one ``file:line: problem`` per bad line.

    Raises:
        UserInputError: the file is missing, unreadable, not UTF-8, or has no root line.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None and problem != "does not exist":
        raise UserInputError(f"{path}: manifest {problem}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{path}: manifest file does not exist") from None
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: manifest is not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise UserInputError(f"{path}: cannot read manifest ({err.strerror})") from None
    # lines end at "\n" (or "\r\n") only: file names may hold other characters str.splitlines breaks at
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if not lines or not lines[0].strip():
        raise UserInputError(f"{path}:1: the first line must be the audio root directory, but is empty")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = path.parent / root
    items = []
    problems = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            problems.append(
                f"{path}:{lineno}: expected 'relpath<TAB>num_samples', but found {len(fields)} "
                f"tab-separated field(s): {line[:80]!r}"
            )
            continue
        relpath, size = fields[0].strip(), fields[1].strip()
        if not relpath:
            problems.append(f"{path}:{lineno}: empty audio path")
            continue
        try:
            num_samples = int(size)
        except ValueError:
            problems.append(f"{path}:{lineno}: num_samples must be an integer, but is {size!r} instead")
            continue
        if num_samples < 0:
            problems.append(f"{path}:{lineno}: num_samples must be >= 0, but is {num_samples} instead")
            continue
        items.append(ManifestItem(relpath=relpath, num_samples=num_samples, line=lineno))
    return Manifest(root=root, items=items, path=path), problems


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a fairseq manifest.

    Args:
        path: the ``.tsv`` file.

    Returns:
        The :class:`Manifest`; a relative root is taken relative to the manifest's directory.

    Raises:
        UserInputError: naming ``file:line`` and the problem for a missing file, an empty file,
            a line that is not ``relpath<TAB>num_samples`` with a non-negative integer length, or
            a missing audio root directory.
    """
    manifest, problems = parse_manifest(path)
    if problems:
        raise UserInputError(
            problems[0] + (f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else "")
        )
    if not manifest.root.is_dir():
        raise UserInputError(f"{path}:1: the audio root directory {manifest.root} does not exist")
    return manifest


def write_manifest(path: str | os.PathLike, root: str | os.PathLike, items: Iterable[ManifestItem]) -> None:
    """Write a fairseq manifest (root on the first line, then ``relpath<TAB>num_samples``).

    Args:
        path: the ``.tsv`` file to write; parent directories are created.
        root: the audio root directory, written as an absolute path.
        items: the items; their ``line`` field is ignored.
    """
    path = Path(path)
    lines = [str(Path(root).resolve())]
    for item in items:
        if "\t" in item.relpath or "\n" in item.relpath:
            raise UserInputError(f"{item.relpath!r}: audio paths must not contain tabs or newlines")
        lines.append(f"{item.relpath}\t{int(item.num_samples)}")
    write_atomic(path, "\n".join(lines) + "\n")


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read a label file (``.ltr`` / ``.wrd``): one line per manifest item.

    Raises:
        UserInputError: for a missing file or one that is not UTF-8 (naming the line).
    """
    return read_text_lines(path, "label file", "transcript is not valid UTF-8")


def words_to_letters(words: str) -> str:
    """fairseq's letter format: ``"HELLO WORLD"`` -> ``"H E L L O | W O R L D |"``."""
    return " ".join(" ".join(w) + " |" for w in words.split())


def check_labels_match(manifest: Manifest, labels: list[str], label_path: str | os.PathLike) -> None:
    """Raise UserInputError unless there is exactly one label line per manifest item."""
    if len(labels) != len(manifest.items):
        raise UserInputError(
            f"{label_path}: has {len(labels)} lines, but the manifest {manifest.path} has "
            f"{len(manifest.items)} items"
        )
