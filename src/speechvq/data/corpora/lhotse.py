"""lhotse manifests: recordings + supervisions, or cuts; JSON lines (``.jsonl``, ``.jsonl.gz``)
or JSON arrays (``.json``, ``.json.gz``).

Read without lhotse, from the fields of its serialised manifests (``Recording.to_dict``,
``SupervisionSegment.to_dict``, ``MonoCut.to_dict``):

* a recording: ``id``, ``sources`` (``[{type, channels, source}]``), ``sampling_rate``,
  ``num_samples``, ``duration``; only ``type: file`` sources are read (a ``url`` or ``command``
  source is refused: speechvq neither downloads nor runs commands);
* a supervision: ``id``, ``recording_id``, ``start``, ``duration`` (seconds), ``text``,
  ``speaker``;
* a cut: ``id``, ``start``, ``duration``, ``recording`` (a recording as above) and
  ``supervisions`` (their ``start`` relative to the cut).

Each supervision is an utterance (a segment of its recording, cut out unless it spans the whole
recording); recordings without a supervision are utterances without text. Each cut is one
utterance whose text is its supervisions' texts in time order and whose speaker is that of its
first supervision. Relative ``source`` paths are resolved against ``audio_root`` (default: the
current directory, where lhotse resolves them).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speechvq.data.corpora.common import CorpusUtterance, resolve_audio
from speechvq.errors import UserInputError

_SAME_S = 1e-3
"""A supervision within this many seconds of both ends of its recording spans all of it."""


def _records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, ``file:line`` or ``file[i]``) of a lhotse manifest file."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            text = fh.read()
    except FileNotFoundError:
        raise UserInputError(f"{path}: lhotse manifest does not exist") from None
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise UserInputError(f"{path}: cannot read lhotse manifest ({err})") from None
    stem = path.name.removesuffix(".gz")
    try:
        if stem.endswith(".json"):
            for i, record in enumerate(json.loads(text)):
                yield record, f"{path}[{i}]"
            return
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield json.loads(line), f"{path}:{lineno}"
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None


def _recording_file(rec: dict[str, Any], where: str, audio_root: Path) -> Path:
    sources = rec.get("sources") or []
    if not sources:
        raise UserInputError(f"{where}: recording {rec.get('id')!r} has no sources")
    src = sources[0]  # one file per channel: the first channel's file
    if src.get("type") != "file":
        raise UserInputError(
            f"{where}: recording {rec.get('id')!r} has a {src.get('type')!r} source; speechvq reads "
            "'file' sources only (it neither downloads nor runs commands)"
        )
    return resolve_audio(str(src["source"]), audio_root)


def _kind(record: dict[str, Any]) -> str:
    if "recording" in record or str(record.get("type", "")).endswith("Cut"):
        return "cut"
    if "sources" in record:
        return "recording"
    if "recording_id" in record:
        return "supervision"
    return "unknown"


def _whole(start: float, duration: float, rec: dict[str, Any]) -> bool:
    total = float(rec.get("duration") or 0.0)
    return abs(start) < _SAME_S and abs(start + duration - total) < _SAME_S


def read_lhotse(
    source: str | os.PathLike[str],
    *extra: str | os.PathLike[str],
    audio_root: str | os.PathLike[str] | None = None,
    **_: object,
) -> list[CorpusUtterance]:
    """The utterances of lhotse manifests.

    Args:
        source: a manifest file, or a directory whose ``*.json*`` files are read (recordings,
            supervisions and cuts are told apart by their fields).
        extra: further manifest files (e.g. the supervisions beside the recordings).
        audio_root: base of relative ``source`` paths (default: the current directory).

    Raises:
        UserInputError: unreadable manifests, unknown records, a supervision of an unknown
            recording, a non-file source (naming the file and line).
    """
    paths = [Path(source), *(Path(p) for p in extra)]
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if ".json" in q.name and q.is_file())
        else:
            files.append(p)
    if not files:
        raise UserInputError(f"{source}: no lhotse manifest (*.jsonl, *.jsonl.gz, *.json) found")
    base = Path(audio_root) if audio_root is not None else Path.cwd()
    recordings: dict[str, tuple[dict[str, Any], str]] = {}
    supervisions: list[tuple[dict[str, Any], str]] = []
    utts: list[CorpusUtterance] = []
    for f in files:
        for record, where in _records(f):
            kind = _kind(record)
            if kind == "recording":
                recordings[str(record["id"])] = (record, where)
            elif kind == "supervision":
                supervisions.append((record, where))
            elif kind == "cut":
                utts.append(_cut(record, where, base))
            else:
                raise UserInputError(
                    f"{where}: neither a recording, a supervision nor a cut: keys {sorted(record)}"
                )
    supervised: set[str] = set()
    for sup, where in supervisions:
        rec_id = str(sup["recording_id"])
        if rec_id not in recordings:
            raise UserInputError(
                f"{where}: supervision {sup.get('id')!r} names recording {rec_id!r}, which no manifest lists"
            )
        rec, rec_where = recordings[rec_id]
        start, duration = float(sup.get("start", 0.0)), float(sup["duration"])
        whole = _whole(start, duration, rec)
        utts.append(
            CorpusUtterance(
                id=str(sup["id"]), audio=_recording_file(rec, rec_where, base), text=sup.get("text"),
                speaker=sup.get("speaker"), start_s=None if whole else start,
                end_s=None if whole else start + duration, origin=where,
            )
        )  # fmt: skip
        supervised.add(rec_id)
    for rec_id, (rec, where) in recordings.items():
        if rec_id not in supervised:
            utts.append(CorpusUtterance(id=rec_id, audio=_recording_file(rec, where, base), origin=where))
    return utts


def _cut(cut: dict[str, Any], where: str, base: Path) -> CorpusUtterance:
    rec = cut.get("recording")
    if not isinstance(rec, dict):
        raise UserInputError(
            f"{where}: cut {cut.get('id')!r} has no recording (only MonoCuts of a recording are read)"
        )
    start, duration = float(cut.get("start", 0.0)), float(cut["duration"])
    sups = sorted(cut.get("supervisions") or [], key=lambda s: float(s.get("start", 0.0)))
    texts = [s["text"] for s in sups if s.get("text")]
    whole = _whole(start, duration, rec)
    return CorpusUtterance(
        id=str(cut["id"]), audio=_recording_file(rec, where, base), text=" ".join(texts) if texts else None,
        speaker=next((s.get("speaker") for s in sups if s.get("speaker")), None),
        start_s=None if whole else start, end_s=None if whole else start + duration, origin=where,
    )  # fmt: skip
