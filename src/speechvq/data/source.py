"""Where utterances come from: a fairseq manifest or a local Hugging Face ``datasets`` dataset.

Local datasets are read with pyarrow directly (no hub access, no ``datasets`` import needed):

* a ``save_to_disk`` directory (``state.json`` + ``*.arrow``; pick a split's subdirectory of a
  ``DatasetDict``),
* parquet files (one file, or a directory holding ``*.parquet`` anywhere below it),
* an ``audiofolder`` directory (audio files, optionally with ``metadata.csv`` / ``metadata.jsonl``
  whose ``file_name`` column names them).

The audio column is the one named ``audio`` (else the first column of ``{bytes, path}`` structs or
of path strings); text comes from a named column.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from speechvq.data.audio import AudioInfo, RawFormat, audio_info, decode_audio, headerless
from speechvq.data.manifest import Manifest, read_manifest
from speechvq.errors import UserInputError
from speechvq.files import path_problem, read_json, read_text

if TYPE_CHECKING:
    import pyarrow as pa

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".sph")
TEXT_COLUMNS = ("text", "transcription", "sentence", "normalized_text")


@dataclass
class Utterance:
    """One utterance of a source, before decoding."""

    name: str
    """Name for messages (the file path, or ``dataset[i]``)."""
    data: str | bytes
    """Path of the audio file, or its encoded bytes."""
    num_frames: int | None
    """Expected native frames (a manifest's ``num_samples``), or None if not listed."""


class AudioSource:
    """Indexable utterances: ``len``, ``utterance(i)``, ``text(i)`` and ``sizes`` at a target rate."""

    def __init__(
        self,
        utts: list[Utterance],
        texts: Sequence[str | bytes] | None,
        description: str,
        ids: list[str] | None = None,
    ) -> None:
        self.utts = utts
        self.texts = texts
        self.description = description
        self.ids = ids if ids is not None else [u.name for u in utts]
        """Short names of the utterances for output files: a manifest's relative paths, a
        dataset's audio ``path`` fields (else the row number)."""

    def __len__(self) -> int:
        return len(self.utts)

    def utterance(self, i: int) -> Utterance:
        return self.utts[i]

    def text(self, i: int) -> str | bytes | None:
        return None if self.texts is None else self.texts[i]

    def sizes(self, sample_rate: int) -> np.ndarray:
        """Samples per utterance at ``sample_rate`` (listed lengths, else read from the headers)."""
        out = np.zeros(len(self.utts), dtype=np.int64)
        for i, utt in enumerate(self.utts):
            if utt.num_frames is not None:
                out[i] = utt.num_frames
                continue
            try:
                info: AudioInfo = audio_info(utt.data, name=utt.name)
            except UserInputError:
                out[i] = 0  # reported when loaded
                continue
            out[i] = round(info.num_frames * sample_rate / info.sample_rate)
        return out

    def load(self, i: int, sample_rate: int, raw_format: RawFormat | None = None) -> np.ndarray:
        """Utterance ``i`` as ``[S]`` float32 at ``sample_rate``; ``raw_format`` reads the files
        that are not a known container (``.raw``, ``.pcm``, ...: :func:`headerless`), so a corpus
        may mix both."""
        utt = self.utts[i]
        wav, _ = decode_audio(
            utt.data,
            sample_rate=sample_rate,
            raw_format=raw_format if headerless(utt.data) else None,
            name=utt.name,
            expected_frames=utt.num_frames,
        )
        return wav


def label_text(value: str | bytes | None) -> str:
    """A label as :meth:`AudioSource.text` returns it, as text (UTF-8 bytes decoded; None: "").

    Raises:
        UnicodeDecodeError: for bytes that are not UTF-8.
    """
    return value.decode("utf-8") if isinstance(value, bytes) else (value or "")


def read_label_lines(path: Path) -> list[bytes]:
    """Raw label lines (decoded per item later, so one bad line spoils only its item)."""
    problem = path_problem(path)
    if problem is not None:
        raise UserInputError(f"{path}: label file {problem}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserInputError(f"{path}: cannot read label file ({err.strerror})") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln.rstrip(b"\r") for ln in lines]


def manifest_source(manifest: Manifest, labels: str | os.PathLike | list[str] | None) -> AudioSource:
    utts = [
        Utterance(
            name=str(manifest.audio_path(it)), data=str(manifest.audio_path(it)), num_frames=it.num_samples
        )
        for it in manifest.items
    ]
    texts: Sequence[str | bytes] | None = None
    if isinstance(labels, list):
        texts = list(labels)
        label_name = "labels"
    elif labels is not None:
        label_path = Path(labels)
        bare = os.sep not in str(labels) and "/" not in str(labels) and "." not in str(labels)
        if bare and manifest.path is not None and not label_path.exists():
            # a bare name (ltr, wrd, spk, ...): the label file of that suffix beside the manifest
            label_path = manifest.path.with_suffix("." + str(labels))
        label_name = str(label_path)
        texts = list(read_label_lines(label_path))
    if texts is not None and len(texts) != len(utts):
        raise UserInputError(
            f"{label_name}: has {len(texts)} lines, but the manifest {manifest.path} has {len(utts)} items"
        )
    return AudioSource(utts, texts, f"manifest {manifest.path}", ids=[it.relpath for it in manifest.items])


def _audio_column(table: pa.Table, path: Path) -> str:
    import pyarrow as pa

    if "audio" in table.column_names:
        return "audio"
    for name in table.column_names:
        t = table.schema.field(name).type
        if pa.types.is_struct(t) and {"bytes", "path"} <= {t.field(k).name for k in range(t.num_fields)}:
            return name
    raise UserInputError(
        f"{path}: no audio column (named 'audio', or of {{bytes, path}} structs) in {table.column_names}"
    )


def _text_column(columns: list[str], labels: str | None, path: Path) -> str | None:
    if labels is None:
        return None
    if labels in columns:
        return labels
    hint = next(
        (f" (give the column's name, e.g. data.labels={c})" for c in TEXT_COLUMNS if c in columns), ""
    )
    raise UserInputError(f"{path}: text column {labels!r} not found; columns are {columns}{hint}")


def arrow_source(
    table: pa.Table, path: Path, labels: str | None, description: str | None = None
) -> AudioSource:
    """Utterances from an arrow table with an audio column of ``{bytes, path}`` structs or paths."""
    col = _audio_column(table, path)
    base = path if path.is_dir() else path.parent
    utts = []
    ids = []
    for i, cell in enumerate(table.column(col).to_pylist()):
        name = f"{path}[{i}]"
        given = cell.get("path") if isinstance(cell, dict) else cell
        ids.append(str(given) if given else str(i))
        if isinstance(cell, dict):
            if cell.get("bytes"):
                utts.append(
                    Utterance(
                        name=f"{name} ({cell.get('path') or 'bytes'})", data=cell["bytes"], num_frames=None
                    )
                )
                continue
            cell = cell.get("path")
        if not cell:
            utts.append(Utterance(name=name, data=b"", num_frames=None))
            continue
        p = Path(cell)
        p = p if p.is_absolute() else base / p
        utts.append(Utterance(name=str(p), data=str(p), num_frames=None))
    text_col = _text_column(table.column_names, labels, path)
    texts = (
        None
        if text_col is None
        else ["" if t is None else str(t) for t in table.column(text_col).to_pylist()]
    )
    return AudioSource(utts, texts, description or f"dataset {path}", ids=ids)


def _read_save_to_disk(path: Path) -> pa.Table:
    import pyarrow as pa

    state = read_json(path / "state.json", "dataset state")
    tables = []
    files = state.get("_data_files", [])
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files
    ):
        raise UserInputError(f"{path / 'state.json'}: `_data_files` must be a list of {{filename}} objects")
    for f in files:
        with pa.memory_map(str(path / f["filename"])) as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    if not tables:
        raise UserInputError(f"{path}: state.json lists no data files")
    return pa.concat_tables(tables)


def audiofolder_source(path: Path, labels: str | None) -> AudioSource:
    """An ``audiofolder`` directory: audio files, plus optional metadata with a ``file_name`` column."""
    meta: dict[str, dict] = {}
    for meta_file in sorted(path.rglob("metadata.csv")) + sorted(path.rglob("metadata.jsonl")):
        rows: list[dict]
        if meta_file.suffix == ".csv":
            with meta_file.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = []
            for lineno, ln in enumerate(
                read_text(meta_file, "metadata file", max_bytes=None).splitlines(), 1
            ):
                if not ln.strip():
                    continue
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError as err:
                    raise UserInputError(f"{meta_file}:{lineno}: invalid JSON: {err.msg}") from None
                if not isinstance(row, dict):
                    raise UserInputError(f"{meta_file}:{lineno}: each line must be a JSON object")
                rows.append(row)
        for row in rows:
            if "file_name" not in row:
                raise UserInputError(f"{meta_file}: metadata needs a 'file_name' column")
            meta[str((meta_file.parent / row["file_name"]).resolve())] = row
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise UserInputError(
            f"{path}: a directory with no audio files (and no dataset files: state.json, *.parquet)"
        )
    utts = [Utterance(name=str(p), data=str(p), num_frames=None) for p in files]
    texts: list[str] | None = None
    if labels is not None:
        texts = []
        for p in files:
            found = meta.get(str(p.resolve()))
            if found is None or labels not in found:
                raise UserInputError(
                    f"{p}: no {labels!r} entry in the folder's metadata.csv / metadata.jsonl"
                )
            texts.append(str(found[labels]))
    return AudioSource(
        utts, texts, f"audiofolder {path}", ids=[p.relative_to(path).as_posix() for p in files]
    )


def hf_dataset_source(dataset: Any, labels: str | None = None, name: str = "dataset") -> AudioSource:
    """An in-memory ``datasets.Dataset`` as an :class:`AudioSource`, without ``datasets``' own
    audio decoding (which needs ``torchcodec`` and FFmpeg): its arrow rows (selection and order
    applied) are read as a saved dataset's are, the audio decoded by soundfile.

    Args:
        dataset: a ``datasets.Dataset`` (not a ``DatasetDict``: pick a split).
        labels: the text column, or None.
        name: the name used in messages.
    """
    if hasattr(dataset, "keys") and not hasattr(dataset, "with_format"):
        raise UserInputError(f"{name}: is a DatasetDict; give one split, one of {list(dataset.keys())}")
    table = dataset.with_format("arrow")[:]  # the raw rows: no decoding, indices applied
    return arrow_source(table, Path.cwd(), labels, description=f"dataset {name}")


def open_source(
    source: str | os.PathLike | Any, labels: str | os.PathLike | list[str] | None = None
) -> AudioSource:
    """Open a manifest (``.tsv``) or a local Hugging Face dataset as an :class:`AudioSource`.

    Args:
        source: manifest file, ``save_to_disk`` directory, parquet file/directory, audiofolder,
            or an in-memory ``datasets.Dataset`` (:func:`hf_dataset_source`).
        labels: for a manifest: a label file path, ``"ltr"``/``"wrd"`` (the file beside the
            manifest) or a list of strings; for a dataset: the text column name.

    Raises:
        UserInputError: the source does not exist or is not one of the formats above.
    """
    if hasattr(source, "with_format") and hasattr(source, "features"):  # a datasets.Dataset
        if labels is not None and not isinstance(labels, str):
            raise UserInputError("a dataset's labels must be the name of its text column")
        return hf_dataset_source(source, labels)
    path = Path(source)
    if not path.exists():
        raise UserInputError(f"{path}: data source does not exist")
    if not path.is_dir() and (problem := path_problem(path)) is not None:
        raise UserInputError(f"{path}: data source {problem}")
    if path.is_file() and path.suffix.lower() in (".tsv", ".txt"):
        return manifest_source(read_manifest(path), labels)
    text_labels = None if labels is None else str(labels)
    if isinstance(labels, list):
        raise UserInputError(
            f"{path}: a list of labels only goes with a manifest; give a dataset's text column"
        )
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise UserInputError(
            f"{path}: reading a Hugging Face dataset needs pyarrow (pip install pyarrow)"
        ) from None
    try:
        return _open_dataset(path, text_labels)
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserInputError(f"{path}: not a readable dataset ({type(err).__name__}: {reason})") from None


def _open_dataset(path: Path, text_labels: str | None) -> AudioSource:
    """A local Hugging Face dataset (parquet, ``save_to_disk``, audiofolder) as an :class:`AudioSource`."""
    import pyarrow.parquet as pq

    if path.is_file() and path.suffix == ".parquet":
        return arrow_source(pq.read_table(path), path, text_labels)
    if path.is_file():
        raise UserInputError(f"{path}: not a manifest (.tsv), parquet file or dataset directory")
    if (path / "dataset_dict.json").exists():
        splits = read_json(path / "dataset_dict.json", "dataset dict").get("splits", [])
        raise UserInputError(f"{path}: is a DatasetDict; give one split's directory, one of {splits}")
    if (path / "state.json").exists():
        return arrow_source(_read_save_to_disk(path), path, text_labels)
    parquets = sorted(path.rglob("*.parquet"))
    if parquets:
        import pyarrow as pa

        table = pa.concat_tables([pq.read_table(p) for p in parquets])
        return arrow_source(table, path, text_labels)
    return audiofolder_source(path, text_labels)
