"""``speechvq download-librispeech``: download, verify and safely extract a LibriSpeech subset.

Usage:
    speechvq download-librispeech --subset train-clean-100 --out data
    speechvq download-librispeech --subset dev-clean --out data --mirror https://us.openslr.org/resources/12

Fetches ``MIRROR/<subset>.tar.gz`` into ``OUT`` (resuming a partial download), checks its MD5
against the published table (or ``--md5`` / ``--checksums md5sum.txt``), and extracts it into
``OUT/LibriSpeech/<subset>``, refusing archives with absolute paths, ``..`` or outside links.
Rerunning after success does nothing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechvq.data.download import LIBRISPEECH_MD5, LIBRISPEECH_MIRROR, download, read_md5_table, safe_extract
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subset", required=True, help=f"one of {', '.join(LIBRISPEECH_MD5)}")
    parser.add_argument("--out", type=Path, required=True, help="directory for the archive and LibriSpeech/")
    parser.add_argument(
        "--mirror", default=LIBRISPEECH_MIRROR, help=f"base URL (default {LIBRISPEECH_MIRROR})"
    )
    parser.add_argument("--md5", default=None, help="expected MD5 (overrides the published table)")
    parser.add_argument("--checksums", type=Path, default=None, help="md5sum.txt file to take the MD5 from")
    parser.add_argument("--remove-archive", action="store_true", help="delete the .tar.gz after extraction")
    parser.add_argument("--no-extract", action="store_true", help="only download and verify")


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    table = dict(LIBRISPEECH_MD5)
    if args.checksums is not None:
        if not args.checksums.exists():
            raise UserInputError(f"{args.checksums}: checksum file does not exist")
        table.update(read_md5_table(args.checksums))
    md5 = args.md5 or table.get(args.subset)
    if md5 is None:
        raise UserInputError(
            f"--subset must be one of {sorted(table)} (or give --md5), but is {args.subset!r} instead"
        )
    done = args.out / "LibriSpeech" / args.subset / ".extracted"
    if done.exists():
        print(f"{args.subset}: already extracted in {done.parent}")
        return 0
    url = f"{args.mirror.rstrip('/')}/{args.subset}.tar.gz"
    archive = download(url, args.out / f"{args.subset}.tar.gz", expected_md5=md5)
    print(f"{archive}: MD5 {md5} verified")
    if args.no_extract:
        return 0
    names = safe_extract(archive, args.out)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(md5 + "\n")
    if args.remove_archive:
        archive.unlink()
    print(f"extracted {len(names)} members into {args.out}")
    return 0
