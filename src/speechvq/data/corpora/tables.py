"""Corpora described by one table: LJSpeech ``metadata.csv``, SpeechBrain csv/json, Common Voice tsv.

* LJSpeech: ``metadata.csv`` with ``id|transcript|normalized transcript`` lines (no header, no
  quoting), audio in ``wavs/<id>.wav`` beside it; the normalised transcript is taken where it is
  given. One speaker, so no speaker ids.
* SpeechBrain: a csv with a header (``ID``, ``duration``, ``wav``, ``spk_id``, ``wrd``, ...) or a
  json object ``{id: {"wav": ..., "spk_id": ..., "wrd": ...}}``, where ``wav`` may also be
  ``{"file", "start", "stop"}`` (samples). ``$data_root`` / ``{data_root}`` in paths is replaced by
  ``data_root``. The transcript is ``text_column`` (default: the first of ``wrd``, ``words``,
  ``transcript``, ``text``), the speaker ``spk_id``.
* Common Voice: a release's ``<split>.tsv`` (``client_id``, ``path``, ``sentence``, ...), audio in
  ``clips/`` beside it; the speaker is ``client_id``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import soundfile as sf

from speechvq.data.corpora.common import CorpusUtterance, resolve_audio
from speechvq.errors import UserInputError

TEXT_COLUMNS = ("wrd", "words", "transcript", "text")
"""SpeechBrain transcript columns tried in order when none is named."""

csv.field_size_limit(1 << 24)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{path}: {what} does not exist") from None
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: {what} is not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise UserInputError(f"{path}: cannot read {what} ({err.strerror})") from None


def read_ljspeech(source: str | os.PathLike[str], **_: object) -> list[CorpusUtterance]:
    """The utterances of an LJSpeech-style corpus (its directory or its ``metadata.csv``)."""
    path = Path(source)
    meta = path / "metadata.csv" if path.is_dir() else path
    utts = []
    for lineno, line in enumerate(_read(meta, "LJSpeech metadata").split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 1 or not fields[0].strip():
            raise UserInputError(f"{meta}:{lineno}: expected 'id|transcript|normalized transcript'")
        utt_id = fields[0].strip()
        texts = [f for f in fields[1:3] if f.strip()]
        utts.append(
            CorpusUtterance(
                id=utt_id, audio=meta.parent / "wavs" / f"{utt_id}.wav", text=texts[-1] if texts else None,
                origin=f"{meta}:{lineno}",
            )
        )  # fmt: skip
    return utts


def _sb_path(value: str, data_root: str | None, base: Path, where: str) -> Path:
    for placeholder in ("$data_root", "{data_root}"):
        if placeholder in value:
            if data_root is None:
                raise UserInputError(f"{where}: the path {value!r} uses {placeholder}: give --data-root")
            value = value.replace(placeholder, str(data_root))
    return resolve_audio(value, base)


def _sb_text(row: dict[str, Any], text_column: str | None, where: str) -> str | None:
    if text_column is not None:
        if text_column not in row:
            raise UserInputError(f"{where}: no column {text_column!r}; columns are {sorted(row)}")
        return None if row[text_column] is None else str(row[text_column])
    for name in TEXT_COLUMNS:
        if row.get(name):
            return str(row[name])
    return None


def read_speechbrain(
    source: str | os.PathLike[str],
    *,
    data_root: str | None = None,
    audio_root: str | os.PathLike[str] | None = None,
    text_column: str | None = None,
    audio_column: str = "wav",
    **_: object,
) -> list[CorpusUtterance]:
    """The utterances of a SpeechBrain csv or json annotation file.

    Args:
        source: the ``.csv`` or ``.json`` file.
        data_root: replaces ``$data_root`` / ``{data_root}`` in paths.
        audio_root: base of relative paths (default: the current directory).
        text_column: transcript column (default: see :data:`TEXT_COLUMNS`).
        audio_column: audio column (default ``wav``).
    """
    path = Path(source)
    base = Path(audio_root) if audio_root is not None else Path.cwd()
    text = _read(path, "SpeechBrain annotation")
    rows: list[tuple[str, dict[str, Any], str]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(data, dict):
            raise UserInputError(
                f"{path}: expected a JSON object {{id: {{...}}}}, but found {type(data).__name__}"
            )
        rows = [(str(k), v, f"{path} entry {k!r}") for k, v in data.items()]
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "ID" not in reader.fieldnames:
            raise UserInputError(f"{path}:1: a SpeechBrain csv needs a header with an ID column")
        rows = [(str(r["ID"]), r, f"{path}:{i}") for i, r in enumerate(reader, start=2)]
    utts = []
    for utt_id, row, where in rows:
        if not isinstance(row, dict) or audio_column not in row:
            raise UserInputError(f"{where}: no {audio_column!r} field")
        wav = row[audio_column]
        start_s = end_s = None
        if isinstance(wav, dict):  # {"file": ..., "start": samples, "stop": samples}
            audio = _sb_path(str(wav["file"]), data_root, base, where)
            if "start" in wav or "stop" in wav:
                rate = _rate(audio, where)
                start_s = int(wav.get("start", 0)) / rate
                end_s = int(wav["stop"]) / rate if "stop" in wav else None
        else:
            audio = _sb_path(str(wav), data_root, base, where)
        speaker = row.get("spk_id")
        utts.append(
            CorpusUtterance(
                id=utt_id, audio=audio, text=_sb_text(row, text_column, where),
                speaker=str(speaker) if speaker not in (None, "") else None, start_s=start_s, end_s=end_s,
                origin=where,
            )
        )  # fmt: skip
    return utts


def _rate(audio: Path, where: str) -> int:
    try:
        return int(sf.info(str(audio)).samplerate)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise UserInputError(f"{where}: {audio}: cannot read the audio header ({err})") from None


def read_commonvoice(source: str | os.PathLike[str], **_: object) -> list[CorpusUtterance]:
    """The utterances of a Common Voice split (its ``.tsv``; audio in ``clips/`` beside it)."""
    path = Path(source)
    if path.is_dir():
        path = path / "validated.tsv"
    reader = csv.DictReader(
        _read(path, "Common Voice tsv").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    missing = {"client_id", "path", "sentence"} - set(reader.fieldnames or [])
    if missing:
        raise UserInputError(f"{path}:1: a Common Voice tsv needs the columns {sorted(missing)}")
    clips = path.parent / "clips"
    utts = []
    for lineno, row in enumerate(reader, start=2):
        name = row["path"]
        utts.append(
            CorpusUtterance(
                id=Path(name).stem, audio=clips / name, text=row["sentence"], speaker=row["client_id"] or None,
                origin=f"{path}:{lineno}",
            )
        )  # fmt: skip
    return utts
