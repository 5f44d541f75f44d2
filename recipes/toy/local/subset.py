#!/usr/bin/env python3
"""A random labelled subset of a split (the demo's "10 minutes of labels"), in manifest order.

Usage:
    python3 local/subset.py data/manifests/train --minutes 10 --out data/manifests/train_10min

Reads ``SPLIT.tsv`` with its ``SPLIT.ltr`` and ``SPLIT.wrd``, shuffles the utterances with
``random.Random(seed)`` and keeps them until their audio reaches ``--minutes``, then writes the
kept ones, in their original order, to ``OUT.tsv``, ``OUT.ltr`` and ``OUT.wrd``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from speechvq.data import read_labels, read_manifest, write_manifest

SAMPLE_RATE = 16000


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("split", type=Path, help="manifest path without .tsv (labels beside it)")
    parser.add_argument("--minutes", type=float, required=True, help="audio to keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    return parser.parse_args()


def main() -> None:
    args = get_args()
    manifest = read_manifest(args.split.with_suffix(".tsv"))
    labels = {ext: read_labels(args.split.with_suffix(f".{ext}")) for ext in ("ltr", "wrd")}
    for ext, lines in labels.items():
        if len(lines) != len(manifest.items):
            raise SystemExit(
                f"{args.split}.{ext}: {len(lines)} lines for {len(manifest.items)} manifest items"
            )
    order = list(range(len(manifest.items)))
    random.Random(args.seed).shuffle(order)
    kept, seconds = [], 0.0
    for i in order:
        if seconds >= args.minutes * 60:
            break
        kept.append(i)
        seconds += manifest.items[i].num_samples / SAMPLE_RATE
    kept.sort()
    write_manifest(args.out.with_suffix(".tsv"), manifest.root, [manifest.items[i] for i in kept])
    for ext, lines in labels.items():
        args.out.with_suffix(f".{ext}").write_text("".join(lines[i] + "\n" for i in kept))
    print(f"{args.out}: {len(kept)} of {len(manifest.items)} utterances, {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
