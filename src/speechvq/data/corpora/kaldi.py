"""Kaldi data directories: ``wav.scp``, ``text``, ``utt2spk``, ``segments``.

Formats (Kaldi's "data preparation" docs): every file has one ``<key> <value>`` line per entry.

* ``wav.scp``: ``<recording-id> <file>``; a value ending in ``|`` is a shell pipeline and one
  holding ``.ark:`` an archive offset. speechvq runs no command listed in a data file and reads
  no archives: both are refused, naming the line (write one audio file per recording first, e.g.
  by running the pipelines with ``sox``/``ffmpeg`` output files, and list those).
* ``segments`` (optional): ``<utterance-id> <recording-id> <start-s> <end-s>``; ``end`` -1 means
  the end of the recording. Without it every recording is one utterance with its own id.
* ``text`` (optional): ``<utterance-id> <transcript>``.
* ``utt2spk`` (optional): ``<utterance-id> <speaker-id>``.

Relative audio paths are resolved against ``audio_root`` (Kaldi resolves them against the
directory the recipe runs in; default: the current directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from speechvq.data.corpora.common import CorpusUtterance, resolve_audio
from speechvq.errors import UserInputError
from speechvq.text.files import read_text_lines


def _table(path: Path, *, min_fields: int = 2) -> dict[str, tuple[str, str]]:
    """``key -> (rest of the line, "file:line")`` of a Kaldi table file."""
    out: dict[str, tuple[str, str]] = {}
    for lineno, line in enumerate(read_text_lines(path, "Kaldi table file"), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        where = f"{path}:{lineno}"
        if len(parts) < min_fields:
            raise UserInputError(f"{where}: expected '<key> <value>', but found {line[:80]!r}")
        key = parts[0]
        if key in out:
            raise UserInputError(f"{where}: key {key!r} repeats (first at {out[key][1]})")
        out[key] = (parts[1] if len(parts) > 1 else "", where)
    return out


def _recording_file(value: str, where: str, audio_root: Path) -> Path:
    value = value.strip()
    if value.endswith("|"):
        raise UserInputError(
            f"{where}: the recording is a piped command ({value[:60]!r}); speechvq runs no command "
            "listed in a data file: write each recording to an audio file and list the files"
        )
    if ".ark:" in value or value.startswith(("ark:", "scp:")):
        raise UserInputError(
            f"{where}: the recording is in a Kaldi archive ({value[:60]!r}); speechvq reads audio "
            "files only: write each recording to an audio file and list the files"
        )
    return resolve_audio(value, audio_root)


def read_kaldi_dir(
    source: str | os.PathLike[str], *, audio_root: str | os.PathLike[str] | None = None, **_: object
) -> list[CorpusUtterance]:
    """The utterances of a Kaldi data directory, in ``segments`` (else ``wav.scp``) order.

    Args:
        source: the data directory (holding ``wav.scp``).
        audio_root: base of relative audio paths (default: the current directory).

    Raises:
        UserInputError: a missing ``wav.scp``, a malformed line, a piped or archive recording, a
            segment naming an unknown recording (each naming ``file:line``).
    """
    data_dir = Path(source)
    if not (data_dir / "wav.scp").is_file():
        raise UserInputError(f"{data_dir}: not a Kaldi data directory (no wav.scp)")
    base = Path(audio_root) if audio_root is not None else Path.cwd()
    wav_scp = _table(data_dir / "wav.scp")
    recordings = {rec: _recording_file(value, where, base) for rec, (value, where) in wav_scp.items()}
    texts = _table(data_dir / "text", min_fields=1) if (data_dir / "text").is_file() else {}
    speakers = _table(data_dir / "utt2spk") if (data_dir / "utt2spk").is_file() else {}
    utts: list[CorpusUtterance] = []
    if (data_dir / "segments").is_file():
        for utt_id, (value, where) in _table(data_dir / "segments").items():
            fields = value.split()
            if len(fields) != 3:
                raise UserInputError(
                    f"{where}: expected '<utterance-id> <recording-id> <start> <end>', but found "
                    f"{utt_id} {value!r}"
                )
            rec, start, end = fields
            if rec not in recordings:
                raise UserInputError(f"{where}: recording {rec!r} is not in {data_dir / 'wav.scp'}")
            try:
                start_s, end_s = float(start), float(end)
            except ValueError:
                raise UserInputError(
                    f"{where}: start and end must be seconds, but are {start!r} {end!r}"
                ) from None
            utts.append(
                CorpusUtterance(
                    id=utt_id,
                    audio=recordings[rec],
                    start_s=start_s,
                    end_s=None if end_s < 0 else end_s,
                    origin=where,
                )
            )
    else:
        utts = [
            CorpusUtterance(id=rec, audio=path, origin=wav_scp[rec][1]) for rec, path in recordings.items()
        ]
    known = {u.id for u in utts}
    for name, table in (("text", texts), ("utt2spk", speakers)):
        unknown = sorted(set(table) - known)
        if unknown:
            raise UserInputError(
                f"{table[unknown[0]][1]}: utterance {unknown[0]!r} of {name} is not a listed utterance"
            )
    for u in utts:
        if u.id in texts:
            u.text = texts[u.id][0]
        if u.id in speakers:
            u.speaker = speakers[u.id][0].strip()
    return utts
