"""``speechvq fit-kmeans``: k-means over one layer's features of a model, for ``export-units``.

Usage:
    speechvq fit-kmeans exp/pretrain/best data/train.tsv --layer 6 --k 100 --out km/l6_k100 --percent 10

Features of ``--layer`` (0 = conv encoder output, ``l`` = Transformer block ``l``) are dumped to
disk in shards of ``--shard-size`` rows (``.npy`` + ``.len``), a random ``--percent`` % of the
rows is drawn from them, and scikit-learn's ``MiniBatchKMeans`` (k-means++ init) is fitted on the
sample. The model is saved as ``centroids.npy`` + ``kmeans.json`` (no pickle).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from speechvq.commands._checks import check_at_least, check_device
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="speechvq model directory")
    parser.add_argument("manifest", help="fairseq manifest (.tsv) or local Hugging Face dataset")
    parser.add_argument(
        "--layer",
        required=True,
        help="0 = conv encoder, l = Transformer block l, transformer_input = the input of block 1",
    )
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--out", required=True, help="output k-means model directory")
    parser.add_argument("--percent", type=float, default=100.0, help="%% of frames to fit on (default 100)")
    parser.add_argument(
        "--shard-size", type=int, default=200_000, help="feature rows per shard (default 200k)"
    )
    parser.add_argument("--features-dir", help="keep the feature shards here (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and k-means seed")
    parser.add_argument("--batch-size", type=int, default=10_000, help="MiniBatchKMeans batch size")
    parser.add_argument("--max-iter", type=int, default=100, help="MiniBatchKMeans max_iter")
    parser.add_argument("--n-init", type=int, default=20, help="k-means++ initialisations to try")
    parser.add_argument("--max-tokens", type=int, default=1_600_000, help="padded samples per forward")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace) -> int:
    from speechvq.errors import UserInputError
    from speechvq.io import load_pretrained
    from speechvq.units.export import dump_features, parse_layer
    from speechvq.units.kmeans import fit_kmeans, sample_rows

    layer = parse_layer(args.layer)
    if args.k < 1:
        raise UserInputError(f"--k must be >= 1, but is {args.k}")
    if not 0 < args.percent <= 100:
        raise UserInputError(f"--percent must be in (0, 100], but is {args.percent}")
    for option, value in (
        ("--shard-size", args.shard_size),
        ("--batch-size", args.batch_size),
        ("--max-iter", args.max_iter),
        ("--n-init", args.n_init),
        ("--max-tokens", args.max_tokens),
    ):
        check_at_least(option, value)
    check_at_least("--seed", args.seed, 0)
    device = check_device(args.device)
    check_output_dir(args.out, "--out")
    if args.features_dir:
        check_output_dir(args.features_dir, "--features-dir")
    model = load_pretrained(args.model).to(device)
    start = time.perf_counter()
    features_dir = (
        Path(args.features_dir) if args.features_dir else Path(tempfile.mkdtemp(prefix="speechvq-feats-"))
    )
    try:
        writer = dump_features(
            model,
            args.manifest,
            layer,
            features_dir,
            shard_size=args.shard_size,
            max_tokens=args.max_tokens,
            desc="fit-kmeans: features",
        )
        rows = sample_rows(features_dir, args.percent, seed=args.seed)
        km = fit_kmeans(
            rows,
            args.k,
            seed=args.seed,
            batch_size=args.batch_size,
            max_iter=args.max_iter,
            n_init=args.n_init,
        )
    finally:
        if not args.features_dir:
            shutil.rmtree(features_dir, ignore_errors=True)
    km.meta.update(
        {
            "model": str(args.model),
            "layer": layer,
            "manifest": str(args.manifest),
            "percent": args.percent,
        }
    )
    km.save(args.out)
    if writer.skipped.total:
        logger.warning(
            "%s: %d utterance(s) skipped (%s)", args.manifest, writer.skipped.total, writer.skipped.describe()
        )
    print(
        f"k={args.k} on {len(rows)} of {writer.num_rows} frames ({writer.num_shards} shards), "
        f"inertia/row {km.meta['inertia_per_row']:.4g} -> {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
