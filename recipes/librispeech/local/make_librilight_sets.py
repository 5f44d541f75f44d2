#!/usr/bin/env python3
"""Manifests and labels for Libri-light's limited-resource fine-tuning sets.

Usage:
    python3 local/make_librilight_sets.py /data/librispeech_finetuning --out data/librilight

Reads Libri-light's ``librispeech_finetuning`` layout (``1h/{0..5}/{clean,other}/<spk>/<chapter>``
and ``9h/{clean,other}/<spk>/<chapter>``, LibriSpeech-style ``*.trans.txt``) and writes
``10min``, ``1h`` and ``10h`` as ``.tsv`` (root = the given directory), ``.wrd`` and ``.ltr``:
10 min = ``1h/0``; 1 h = ``1h/*``; 10 h = ``1h/*`` + ``9h``. Existing outputs are kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from speechvq.data.librispeech import LibriUtterance, scan_split, write_split
from speechvq.errors import UserInputError

log = logging.getLogger("make_librilight_sets")

SETS = {"10min": ["1h/0"], "1h": [f"1h/{i}" for i in range(6)], "10h": [f"1h/{i}" for i in range(6)] + ["9h"]}


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="librispeech_finetuning directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ext", default="flac")
    return parser.parse_args()


def make_sets(root: Path, out: Path, ext: str = "flac") -> dict[str, int]:
    """Write the three sets; returns the number of utterances in each."""
    if not (root / "1h").is_dir():
        raise UserInputError(f"{root}: not a Libri-light librispeech_finetuning directory (no 1h/)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, parts in SETS.items():
        utts: list[LibriUtterance] = []
        for part in parts:
            for sub in sorted((root / part).glob("*")):  # clean, other
                if not sub.is_dir():
                    continue
                found, problems = scan_split(sub, ext)
                for problem in problems:
                    log.warning("%s", problem)
                prefix = sub.relative_to(root).as_posix()
                utts += [LibriUtterance(f"{prefix}/{u.relpath}", u.num_samples, u.words) for u in found]
        if not utts:
            raise UserInputError(f"{root}: no utterances found for the {name} set ({', '.join(parts)})")
        if (out / f"{name}.tsv").exists():
            log.info("%s exists, kept", out / f"{name}.tsv")
        else:
            write_split(root, out, name, utts)
        counts[name] = len(utts)
        log.info("%s: %d utterances", name, len(utts))
    return counts


def main() -> int:
    args = get_args()
    try:
        make_sets(args.root, args.out, args.ext)
    except UserInputError as err:
        print(f"make_librilight_sets: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(main())
