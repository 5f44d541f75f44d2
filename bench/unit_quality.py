#!/usr/bin/env python3
"""Unit quality (PNMI, phone purity) of spectral vs pretrained units on the synthetic corpus.

Usage:
    speechvq synth-corpus --out data/synth --hours 1
    python bench/unit_quality.py exp/pretrain_small/best data/synth --ks 50 100 500
    python bench/unit_quality.py exp/pretrain_small/best data/synth --ks 50 100 --layers 2 4 --json q.json

Rows of the table, each scored on the corpus's test split against its ``.phones`` alignments:

- ``log-mel k-means``: k-means (fitted on the train split) over 40 log-mel energies per 25 ms
  window, 20 ms hop (the wav2vec 2.0 frame grid), normalised per utterance: the spectral baseline;
- ``codes``: the model's quantizer indices, one joint id per frame (K = V^G, not a choice);
- ``k-means layer L``: k-means (fitted on train) over a layer's features: ``transformer_input``
  (the input of block 1, after the learned projection and positional convolution) or block L's
  output. The layer with the best PNMI at each K is reported (``--layers`` restricts the search;
  layer 0, the front end's output, is a learned layer only for the raw-waveform CNN).

Every k-means uses the same settings (``--percent`` of the train frames, k-means++ init,
``--n-init`` restarts).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speechvq.data import ManifestItem, audio_info, write_manifest
from speechvq.io import load_pretrained
from speechvq.models.protocol import AudioModel
from speechvq.units.export import (
    SAMPLE_RATE,
    TRANSFORMER_INPUT,
    dump_features,
    export_units,
    iter_manifest,
    parse_layer,
)
from speechvq.units.io import UnitWriter, read_units
from speechvq.units.kmeans import FeatureShardWriter, KMeansModel, fit_kmeans, sample_rows
from speechvq.units.quality import UnitQuality, evaluate_units

logger = logging.getLogger("bench.unit_quality")
LOGMEL_WINDOW = 400  # samples of the baseline's analysis window (25 ms)


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="speechvq wav2vec 2.0 model directory")
    p.add_argument("corpus", type=Path, help="synthetic corpus root (with train/ and test/)")
    p.add_argument("--ks", type=int, nargs="+", default=[50, 100, 500], help="k-means sizes")
    p.add_argument(
        "--layers",
        type=parse_layer,
        nargs="+",
        help="layers to search (default: transformer_input and every block)",
    )
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--percent", type=float, default=100.0, help="%% of train frames to fit on")
    p.add_argument("--n-init", type=int, default=3, help="k-means++ restarts")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--work-dir", type=Path, help="keep manifests, features and units here")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    return p.parse_args()


def corpus_manifest(split_dir: Path, out: Path) -> Path:
    """A manifest of every ``.flac`` below ``split_dir``, sorted by path."""
    files = sorted(split_dir.rglob("*.flac"))
    if not files:
        raise SystemExit(f"{split_dir}: no .flac files")
    items = [ManifestItem(str(f.relative_to(split_dir)), audio_info(f).num_frames, 0) for f in files]
    write_manifest(out, split_dir, items)
    return out


def log_mel(waveform: torch.Tensor, stride: int, num_mels: int = 40) -> torch.Tensor:
    """``[S]`` -> ``[T, num_mels]`` log-mel energies, 25 ms windows every ``stride`` samples, no
    padding (T = floor((S - 400) / stride) + 1, the wav2vec 2.0 frame count), per-utterance CMVN."""
    from transformers.audio_utils import mel_filter_bank

    win = LOGMEL_WINDOW
    frames = waveform.unfold(0, win, stride) * torch.hann_window(win)  # (S,) -> (T, win)
    power = torch.fft.rfft(frames, n=512).abs() ** 2  # (T, 257)
    bank = mel_filter_bank(
        num_frequency_bins=257, num_mel_filters=num_mels, min_frequency=20.0, max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )  # fmt: skip
    feats = torch.log(power @ torch.from_numpy(bank).float() + 1e-6)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def logmel_rows(model: AudioModel, manifest: Path, directory: Path) -> FeatureShardWriter:
    writer = FeatureShardWriter(directory, shard_size=200_000)
    for batch in iter_manifest(manifest, model):
        for w, n in zip(batch.waveforms, batch.lengths.tolist()):
            writer.add(log_mel(w[:n], model.frame_stride))
    writer.close()
    return writer


def logmel_units(model: AudioModel, manifest: Path, km: KMeansModel, out: Path) -> Path:
    stride = model.frame_stride
    with UnitWriter(
        out,
        frame_stride_s=stride / SAMPLE_RATE,
        frame_centre_s=LOGMEL_WINDOW / 2 / SAMPLE_RATE,  # the middle of the frame's window
        meta={"kind": "logmel-kmeans"},
    ) as writer:
        for batch in iter_manifest(manifest, model):
            tokens: list[list[int]] = [[] for _ in batch.relpaths]
            for pos, w, n in zip(batch.usable, batch.waveforms, batch.lengths.tolist()):
                tokens[pos] = km.predict(log_mel(w[:n], stride)).tolist()
            for relpath, toks in zip(batch.relpaths, tokens):
                writer.write(relpath, toks)
    return out


def row(name: str, k: int | str, q: UnitQuality, seconds: float) -> dict[str, object]:
    return {"units": name, "K": k, "pnmi": q.pnmi, "phone_purity": q.phone_purity,
            "cluster_purity": q.cluster_purity, "used_units": q.num_units, "frames": q.num_frames, "seconds": round(seconds, 1)}  # fmt: skip


def main() -> None:
    args = get_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = load_pretrained(args.model).eval()
    if not (isinstance(model, AudioModel) and model.has_transformer):
        raise SystemExit(f"{args.model}: a model with a Transformer is needed (wav2vec 2.0, CTC)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="speechvq-unit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train = corpus_manifest(args.corpus / args.train_split, work / "train.tsv")
    test = corpus_manifest(args.corpus / args.test_split, work / "test.tsv")
    test_root = args.corpus / args.test_split
    logger.info("receptive field %d samples, stride %d", model.receptive_field, model.frame_stride)

    def fit(rows_dir: Path, k: int) -> KMeansModel:
        rows = sample_rows(rows_dir, args.percent)
        return fit_kmeans(rows, k, n_init=args.n_init, max_iter=args.max_iter)

    rows: list[dict[str, object]] = []
    # (a) spectral baseline
    logmel_rows(model, train, work / "feats_logmel")
    for k in args.ks:
        t = time.perf_counter()
        units = logmel_units(model, test, fit(work / "feats_logmel", k), work / f"units_logmel_k{k}")
        rows.append(
            row("log-mel k-means", k, evaluate_units(read_units(units), test_root), time.perf_counter() - t)
        )
    # (b) quantizer codes
    t = time.perf_counter()
    export_units(model, test, work / "units_codes", kind="codes", joint=True)
    codes = read_units(work / "units_codes")
    rows.append(
        row(
            "codes (joint)",
            codes.meta["vocab_size"],
            evaluate_units(codes, test_root),
            time.perf_counter() - t,
        )
    )
    # (c) k-means on each layer; the best layer per K
    layers = args.layers or [TRANSFORMER_INPUT, *range(1, model.num_layers + 1)]
    if 0 in layers and model.cfg.encoder.kind == "fbank":
        logger.warning(
            "layer 0 of a log-mel front end has no weights: it is a spectral baseline, not pretrained"
        )
    for k in args.ks:
        best: tuple[float, dict[str, object]] | None = None
        for layer in layers:
            t = time.perf_counter()
            feats = work / f"feats_l{layer}"
            if not feats.exists():
                dump_features(model, train, layer, feats, shard_size=200_000)
            out = work / f"units_l{layer}_k{k}"
            export_units(model, test, out, kind="kmeans", layer=layer, kmeans=fit(feats, k))
            q = evaluate_units(read_units(out), test_root)
            logger.info("layer %s, K=%d: PNMI %.4f", layer, k, q.pnmi)
            r = row(f"k-means layer {layer}", k, q, time.perf_counter() - t)
            if best is None or q.pnmi > best[0]:
                best = (q.pnmi, r)
        assert best is not None
        rows.append(best[1])

    print(
        f"\nmodel {args.model}, corpus {args.corpus} (fit: {args.train_split}, scored: {args.test_split})\n"
    )
    print("| units | K | PNMI | phone purity | cluster purity | units used | frames |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['units']} | {r['K']} | {r['pnmi']:.3f} | {r['phone_purity']:.3f} | "
              f"{r['cluster_purity']:.3f} | {r['used_units']} | {r['frames']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    np.set_printoptions(precision=4)
    main()
