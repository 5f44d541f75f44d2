#!/usr/bin/env python3
"""Concatenate manifests (and their .ltr/.wrd labels) under their common root.

Usage:
    python3 local/combine_manifests.py data/manifests/train-clean-100.tsv ... --out data/manifests/train-960.tsv

Label files are combined only when every input has one. An existing output is kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from speechvq.data import ManifestItem, read_labels, read_manifest, write_manifest
from speechvq.errors import UserInputError

log = logging.getLogger("combine_manifests")


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def combine(paths: list[Path], out: Path) -> int:
    """Write the combined manifest (and labels); returns the number of items."""
    manifests = [read_manifest(p) for p in paths]
    root = Path(os.path.commonpath([str(m.root.resolve()) for m in manifests]))
    items = []
    for m in manifests:
        prefix = m.root.resolve().relative_to(root)
        items += [ManifestItem((prefix / it.relpath).as_posix(), it.num_samples, 0) for it in m.items]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, root, items)
    for ext in (".ltr", ".wrd"):
        labels = [p.with_suffix(ext) for p in paths]
        if all(label.is_file() for label in labels):
            lines = [line for label in labels for line in read_labels(label)]
            out.with_suffix(ext).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(items)


def main() -> int:
    args = get_args()
    if args.out.exists():
        log.info("%s exists, kept", args.out)
        return 0
    try:
        count = combine(args.manifests, args.out)
    except UserInputError as err:
        print(f"combine_manifests: error: {err}", file=sys.stderr)
        return 2
    log.info("wrote %s (%d items)", args.out, count)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(main())
