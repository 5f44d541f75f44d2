#!/usr/bin/env python3
"""Write a toy corpus of synthetic "speech": sequences of harmonic tones from a small inventory.

Each utterance strings together 100-300 ms segments; each segment is one of ``--num-units``
"phones" (a fixed f0 and two formant-like partials) with a little noise, so the audio has
discrete, predictable structure for the contrastive task to learn. Writes
``OUT/wav/*.wav`` (16 kHz) plus ``OUT/train.tsv`` and ``OUT/valid.tsv`` manifests; does nothing if
the manifests already exist.

Usage:
    python local/make_audio.py --out data --num-files 64
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import soundfile as sf

from speechvq.data import ManifestItem, write_manifest

SAMPLE_RATE = 16000


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num-files", type=int, default=64, help="utterances to write (default 64)")
    parser.add_argument("--num-units", type=int, default=12, help="size of the tone inventory (default 12)")
    parser.add_argument("--seconds", type=float, nargs=2, default=(1.5, 3.0), help="min and max duration")
    parser.add_argument(
        "--segment-ms", type=float, nargs=2, default=(100.0, 300.0), help="min and max unit length"
    )
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of files for validation")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_audio(
    out: Path,
    num_files: int,
    num_units: int,
    seconds: tuple[float, float],
    segment_ms: tuple[float, float],
    valid_fraction: float,
    seed: int,
) -> None:
    """Write the wavs and the train/valid manifests under ``out``."""
    if (out / "train.tsv").is_file() and (out / "valid.tsv").is_file():
        logging.info("%s already has manifests, skipping", out)
        return
    rng = np.random.default_rng(seed)
    units = [
        (rng.uniform(90, 250), rng.uniform(300, 1000), rng.uniform(1000, 3000)) for _ in range(num_units)
    ]
    (out / "wav").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(num_files):
        total = int(SAMPLE_RATE * rng.uniform(*seconds))
        pieces, n = [], 0
        while n < total:
            length = int(SAMPLE_RATE * rng.uniform(*segment_ms) / 1000)
            f0, f1, f2 = units[rng.integers(num_units)]
            t = np.arange(length) / SAMPLE_RATE
            seg = (
                0.4 * np.sin(2 * np.pi * f0 * t)
                + 0.2 * np.sin(2 * np.pi * f1 * t)
                + 0.1 * np.sin(2 * np.pi * f2 * t)
            )
            ramp = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / 80)
            pieces.append(seg * ramp)
            n += length
        wav = np.concatenate(pieces)[:total] + 0.02 * rng.standard_normal(total)
        name = f"wav/toy{i:04d}.wav"
        sf.write(out / name, wav.astype(np.float32), SAMPLE_RATE)
        items.append(ManifestItem(relpath=name, num_samples=total, line=0))
    num_valid = max(1, round(valid_fraction * num_files))
    write_manifest(out / "valid.tsv", out, items[:num_valid])
    write_manifest(out / "train.tsv", out, items[num_valid:])
    logging.info("wrote %d utterances (%d for validation) to %s", num_files, num_valid, out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = get_args()
    logging.info(vars(args))
    make_audio(
        args.out,
        args.num_files,
        args.num_units,
        tuple(args.seconds),
        tuple(args.segment_ms),
        args.valid_fraction,
        args.seed,
    )
