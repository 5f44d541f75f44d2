"""``speechvq manifest``: scan an audio tree into fairseq-style manifests.

Usage:
    speechvq manifest data/LibriSpeech/train-clean-100 --ext flac --valid-percent 1 --out data/manifests

Writes ``OUT/train.tsv`` and, with ``--valid-percent`` > 0, ``OUT/valid.tsv`` (a random
``P`` percent of the files, chosen by ``--seed``). Lengths are the files' native frame counts.
Files that cannot be read are listed and left out.
"""

from __future__ import annotations

import argparse
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from speechvq import progress
from speechvq.data.audio import audio_info
from speechvq.data.manifest import ManifestItem, write_manifest
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="directory to scan (recursively)")
    parser.add_argument("--ext", default="flac", help="audio file extension (default: flac)")
    parser.add_argument("--valid-percent", type=float, default=1.0, help="percent of files for valid.tsv")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    parser.add_argument("--path-must-contain", default=None, help="keep only paths containing this string")


def scan(root: Path, ext: str, must_contain: str | None = None) -> tuple[list[ManifestItem], list[str]]:
    """Items (sorted by path) for every ``*.ext`` under ``root``, and problems with unreadable files."""
    files = sorted(p for p in root.rglob(f"*.{ext.lstrip('.')}") if p.is_file())
    if must_contain:
        files = [p for p in files if must_contain in str(p)]

    def header(p: Path) -> ManifestItem | str:
        try:
            info = audio_info(p)
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
    if not args.ext.strip(". "):
        raise UserInputError(f"--ext must name an audio file extension such as flac, but is {args.ext!r}")
    check_output_dir(args.out, "--out")
    items, problems = scan(args.root, args.ext, args.path_must_contain)
    for p in problems:
        logger.warning("skipped %s", p)
    if not items:
        raise UserInputError(f"{args.root}: no readable *.{args.ext} files found")
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
