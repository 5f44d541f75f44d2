"""``speechvq manifest``: scan an audio tree into fairseq-style manifests.

Usage:
    speechvq manifest data/LibriSpeech/train-clean-100 --ext flac --valid-percent 1 --out data/manifests
    speechvq manifest data/mixed --out data/manifests                 # every audio file soundfile reads
    speechvq manifest data/mixed --ext wav,flac,mp3,aiff --out data/manifests
    speechvq manifest data/pcm --raw-format 16000:1:PCM_16 --out data/manifests   # + headerless .raw/.pcm

Writes ``OUT/train.tsv`` and, with ``--valid-percent`` > 0, ``OUT/valid.tsv`` (a random
``P`` percent of the files, chosen by ``--seed``). Lengths are the files' native frame counts.
``--ext`` takes a comma list (or is repeated); without it every container this libsndfile reads
is indexed (wav, flac, ogg, opus, mp3, aiff, au, w64, caf, sph, ...). With ``--raw-format``,
headerless files (``.raw``, ``.pcm``, ``.s16``, ``.f32``, and any ``--ext`` that is not a
container) are indexed too; their length comes from the file size, and training reads them with
the same format (``data.raw_format``). Files that cannot be read are listed and left out.
"""

from __future__ import annotations

import argparse
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from speechvq import progress
from speechvq.data.audio import RAW_SUFFIXES, RawFormat, audio_info, headerless, readable_suffixes
from speechvq.data.manifest import ManifestItem, write_manifest
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="directory to scan (recursively)")
    parser.add_argument(
        "--ext",
        action="append",
        default=None,
        help="audio file extensions, comma-separated or repeated (default: every container "
        "soundfile reads, plus .raw/.pcm/.s16/.f32 with --raw-format)",
    )
    parser.add_argument(
        "--raw-format",
        type=RawFormat.parse,
        default=None,
        help="RATE[:CHANNELS[:SUBTYPE[:ENDIAN]]] of headerless files, e.g. 16000:1:PCM_16",
    )
    parser.add_argument("--valid-percent", type=float, default=1.0, help="percent of files for valid.tsv")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    parser.add_argument("--path-must-contain", default=None, help="keep only paths containing this string")


def extensions(ext: list[str] | str | None, raw_format: RawFormat | None) -> tuple[str, ...]:
    """The suffixes (``.flac``, ...) that ``--ext`` names (comma lists, repeated), or by default
    every readable container, plus the headerless suffixes when a raw format is given."""
    if ext is None:
        found = list(readable_suffixes()) + (list(RAW_SUFFIXES) if raw_format is not None else [])
    else:
        items = [ext] if isinstance(ext, str) else ext
        found = ["." + e.strip().lower().lstrip(".") for item in items for e in item.split(",") if e.strip()]
    if not found:
        raise UserInputError("--ext names no extension")
    if raw_format is None:
        raw = [e for e in found if headerless("x" + e)]
        if raw:
            raise UserInputError(
                f"--ext {','.join(raw)}: headerless audio needs --raw-format (e.g. 16000:1:PCM_16)"
            )
    return tuple(dict.fromkeys(found))


def scan(
    root: Path,
    ext: list[str] | str | None = None,
    must_contain: str | None = None,
    raw_format: RawFormat | None = None,
) -> tuple[list[ManifestItem], list[str]]:
    """Items (sorted by path) for every file under ``root`` with one of the ``ext`` suffixes (see
    :func:`extensions`), and problems with unreadable files."""
    suffixes = extensions(ext, raw_format)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if must_contain:
        files = [p for p in files if must_contain in str(p)]

    def header(p: Path) -> ManifestItem | str:
        try:
            info = audio_info(p, raw_format=raw_format if headerless(p) else None)
        except UserInputError as err:
            return str(err)
        return ManifestItem(relpath=p.relative_to(root).as_posix(), num_samples=info.num_frames, line=0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            progress.track(pool.map(header, files), total=len(files), desc="manifest", unit="file")
        )
    items = [r for r in results if isinstance(r, ManifestItem)]
    problems = [r for r in results if isinstance(r, str)]
    return items, problems


def run(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise UserInputError(f"{args.root}: is not a directory")
    if not 0 <= args.valid_percent <= 100:
        raise UserInputError(f"--valid-percent must be in [0, 100], but is {args.valid_percent} instead")
    check_output_dir(args.out, "--out")
    items, problems = scan(args.root, args.ext, args.path_must_contain, args.raw_format)
    for p in problems:
        logger.warning("skipped %s", p)
    if not items:
        names = ", ".join(extensions(args.ext, args.raw_format))
        raise UserInputError(f"{args.root}: no readable audio files found ({names})")
    rng = random.Random(args.seed)
    is_valid = [rng.random() < args.valid_percent / 100 for _ in items]
    train = [it for it, v in zip(items, is_valid) if not v]
    valid = [it for it, v in zip(items, is_valid) if v]
    write_manifest(args.out / "train.tsv", args.root, train)
    if args.valid_percent > 0:
        write_manifest(args.out / "valid.tsv", args.root, valid)
    print(
        f"{len(train)} train, {len(valid)} valid items -> {args.out}"
        + (f"; {len(problems)} unreadable" if problems else "")
    )
    return 0
