"""``speechvq extract-features``: continuous features of chosen layers, for downstream models.

Usage:
    speechvq extract-features exp/pretrain/best_model data/test.tsv --layers 6 --out feats/test
    speechvq extract-features exp/pretrain/best_model data/hf_test --layers 0,transformer_input,4 \\
        --out feats/test --format safetensors
    speechvq extract-features exp/pretrain/best_model long.tsv --layers 6 --out feats/long --chunk-s 10 --context-s 2.5

MODEL is a speechvq model directory (wav2vec 2.0, CTC, vq-wav2vec); DATA a manifest or a local
Hugging Face dataset. Layers: 0 = the feature encoder (log-mel or CNN), ``transformer_input`` =
the input of block 1, ``l`` = the output of Transformer block ``l``. Recordings longer than
``--chunk-s + 2 * --context-s`` seconds run in overlapping windows, in memory bounded by the
window (docs/features.md). The output format is described in :mod:`speechvq.units.extract`.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="speechvq model directory (wav2vec 2.0, CTC or vq-wav2vec)")
    parser.add_argument("data", help="manifest (.tsv) or local Hugging Face dataset")
    parser.add_argument("--layers", required=True, help="comma-separated: 0, transformer_input, 1, 2, ...")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--format", choices=["npy", "safetensors"], default="npy", help="storage (default npy)"
    )
    parser.add_argument(
        "--chunk-s", type=float, default=10.0, help="seconds of output per window (default 10)"
    )
    parser.add_argument(
        "--context-s",
        type=float,
        default=2.5,
        help="seconds of context on each side of a window (default 2.5)",
    )
    parser.add_argument("--no-chunking", action="store_true", help="run every recording whole")
    parser.add_argument("--shard-frames", type=int, default=50_000, help="frames per shard (default 50000)")
    parser.add_argument("--batch-size", type=int, default=16, help="short utterances per batch (default 16)")
    parser.add_argument(
        "--max-tokens", type=int, default=1_600_000, help="padded samples per batch (default 1.6M = 100 s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace) -> int:
    from speechvq.commands._checks import check_device
    from speechvq.files import check_output_dir
    from speechvq.io import load_pretrained
    from speechvq.units.extract import extract_features, parse_layers
    from speechvq.units.longform import ChunkConfig

    layers = parse_layers(args.layers)
    check_output_dir(args.out, "--out")
    chunk = None if args.no_chunking else ChunkConfig(chunk_s=args.chunk_s, context_s=args.context_s)
    model = load_pretrained(args.model).to(check_device(args.device)).eval()
    start = time.perf_counter()
    meta = extract_features(
        model, args.data, args.out, layers, storage=args.format, chunk=chunk, shard_frames=args.shard_frames,
        max_tokens=args.max_tokens, max_items=args.batch_size, meta={"model": str(args.model)},
    )  # fmt: skip
    print(f"{meta['num_utterances']} utterances -> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
