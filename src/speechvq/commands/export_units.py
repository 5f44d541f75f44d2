"""``speechvq export-units``: frame-level discrete units of a manifest, one line per utterance.

Usage:
    speechvq export-units exp/pretrain/best data/train.tsv --out units/train --kind codes
    speechvq export-units exp/pretrain/best data/train.tsv --out units/train --kind codes --joint --dedup
    speechvq export-units exp/pretrain/best data/train.tsv --out units/km100 --kind kmeans \\
        --layer 6 --km km/l6_k100

``codes`` writes the quantizer's per-frame indices as vq-wav2vec tokens (``g0-g1``), or with
``--joint`` one id per frame (``g0 * V + g1``); ``kmeans`` assigns the features of ``--layer`` to
the ``fit-kmeans`` model ``--km``. MANIFEST may also be a local Hugging Face dataset (``utts.txt``
then lists its audio ``path`` fields). Recordings longer than ``--chunk-s + 2 * --context-s``
seconds run in overlapping windows (as ``extract-features``; docs/features.md). The output directory format is described in
``speechvq.units.io`` and ``docs/units.md``. Utterances stream through the model in batches of at
most ``--shard-size`` items and ``--max-tokens`` padded samples, and each line is written as soon
as it is computed, so memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import logging
import time

from speechvq.commands._checks import check_at_least, check_device
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="speechvq model directory (wav2vec 2.0, vq-wav2vec or CTC)")
    parser.add_argument("manifest", help="fairseq manifest (.tsv) or local Hugging Face dataset")
    parser.add_argument("--out", required=True, help="output units directory")
    parser.add_argument("--kind", choices=["codes", "kmeans"], required=True, help="unit kind")
    parser.add_argument(
        "--layer",
        help="kmeans: layer (0 = conv encoder, l = Transformer block l, transformer_input = the input of block 1)",
    )
    parser.add_argument("--km", help="kmeans: a fit-kmeans model directory")
    parser.add_argument("--joint", action="store_true", help="codes: one joint id per frame (g0 * V + g1)")
    parser.add_argument("--dedup", action="store_true", help="collapse repeated units; write durations.txt")
    parser.add_argument("--shard-size", type=int, default=64, help="utterances per batch (default 64)")
    parser.add_argument(
        "--max-tokens", type=int, default=1_600_000, help="padded samples per batch (default 1.6M = 100 s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--chunk-s",
        type=float,
        default=10.0,
        help="long recordings: seconds of units per window (default 10)",
    )
    parser.add_argument(
        "--context-s", type=float, default=2.5, help="long recordings: context on each side (default 2.5)"
    )


def run(args: argparse.Namespace) -> int:
    from speechvq.io import load_pretrained
    from speechvq.units.export import export_units, parse_layer
    from speechvq.units.kmeans import KMeansModel
    from speechvq.units.longform import ChunkConfig

    if args.kind == "kmeans" and (args.km is None or args.layer is None):
        raise UserInputError("--kind kmeans needs --km and --layer")
    if args.kind == "codes" and (args.km is not None or args.layer is not None):
        raise UserInputError("--km and --layer only apply to --kind kmeans")
    check_at_least("--shard-size", args.shard_size)
    check_at_least("--max-tokens", args.max_tokens)
    device = check_device(args.device)
    check_output_dir(args.out, "--out")
    km = KMeansModel.load(args.km) if args.km else None
    layer = parse_layer(args.layer) if args.layer is not None else None
    if km is not None and km.meta.get("layer") is not None and km.meta["layer"] != layer:
        logger.warning("%s was fitted on layer %s, but --layer is %s", args.km, km.meta["layer"], layer)
    model = load_pretrained(args.model).to(device)
    start = time.perf_counter()
    meta = export_units(
        model,
        args.manifest,
        args.out,
        kind=args.kind,
        layer=layer,
        kmeans=km,
        joint=args.joint,
        dedup=args.dedup,
        max_tokens=args.max_tokens,
        max_items=args.shard_size,
        meta={"model": str(args.model), "km": args.km},
        chunk=ChunkConfig(chunk_s=args.chunk_s, context_s=args.context_s),
    )
    skipped = meta.get("skipped") or {}
    note = ""
    if skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        note = f" ({sum(skipped.values())} skipped, written as empty lines: {detail})"
    print(f"{meta['num_utterances']} utterances -> {args.out}{note} in {time.perf_counter() - start:.1f} s")
    return 0
