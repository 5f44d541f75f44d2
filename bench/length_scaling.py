#!/usr/bin/env python3
"""Training-step time and peak memory against utterance length, speechvq vs the references.

Usage:
    python bench/length_scaling.py --config small --precision bf16 --lengths 1 2 4 8 16 30
    python bench/length_scaling.py --config base --impls speechvq fairseq --batch 2
    python bench/length_scaling.py --device cuda --config base --batch 8 --lengths 2 4 8 16 30

Each (implementation, length) point runs in its own subprocess: a batch of ``--batch`` utterances
of that length, the step of `bench/pretrain_step.py` (same model, masking, K=100 distractors,
forward + backward + Adam), ``--warmup`` untimed steps, then the median of ``--steps`` timed ones.
Peak memory is the subprocess's ``VmHWM`` (its resident high-water mark), so every point starts
from a fresh process and the numbers do not leak into each other. The points run one after
another, so machine load is not shared evenly as in ``pretrain_step.py``'s alternating run: read
the ratios with that in mind, and rerun on an idle machine for figures to publish. On a GPU
(``--device cuda``) peak memory is the peak CUDA memory allocated, and fp32 is without TF32.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_step as step_bench  # the sibling benchmark's step functions

log = logging.getLogger("bench")


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", help="speechvq preset (small, base, large)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["speechvq", "speechvq+ckpt", "transformers", "fairseq"],
        help="speechvq+ckpt: speechvq with activation checkpointing",
    )
    parser.add_argument("--lengths", nargs="+", type=float, default=[1, 2, 4, 8, 16, 30])
    parser.add_argument("--batch", type=int, default=1, help="utterances per step, all of one length")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--point", nargs=2, metavar=("IMPL", "SECONDS"), help=argparse.SUPPRESS)
    return parser.parse_args()


def speechvq_checkpointed_step_fn(cfg, x, lengths, precision: str):
    """speechvq with activation checkpointing of the conv layers and the Transformer blocks."""
    cfg.encoder.checkpoint_activations = cfg.context.checkpoint_activations = True
    return step_bench.speechvq_step_fn(cfg, x, lengths, precision)


STEP_FNS = {**step_bench.STEP_FNS, "speechvq+ckpt": speechvq_checkpointed_step_fn}


def run_point(impl: str, seconds: float, args: argparse.Namespace) -> dict[str, float]:
    """One implementation at one length, in this process: median step time and peak memory."""
    torch.set_num_threads(args.threads)
    step_bench.no_tf32()
    x, lengths = step_bench.make_batch([seconds] * args.batch, args.device)
    step, _ = STEP_FNS[impl](step_bench.bench_config(args.config), x, lengths, args.precision)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        step_bench.synchronize(x.device)
        start = time.perf_counter()
        step()
        step_bench.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": step_bench.peak_memory_mb(x.device)}


def main() -> None:
    args = get_args()
    if args.point:
        impl, seconds = args.point
        print(json.dumps(run_point(impl, float(seconds), args)))
        return
    impls = [i for i in args.impls if step_bench.available(i)]
    results = []
    for seconds in args.lengths:
        for impl in impls:
            cmd = [sys.executable, __file__, "--point", impl, str(seconds)]
            cmd += ["--config", args.config, "--precision", args.precision, "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            cmd += ["--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. out of memory at 30 s: record it, go on
                tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                log.warning("%s at %.0f s failed: %s", impl, seconds, tail)
                results.append({"seconds": seconds, "impl": impl, "error": tail})
                continue
            point = json.loads(done.stdout.strip().splitlines()[-1])
            point.update(seconds=seconds, impl=impl, audio_s_per_s=seconds * args.batch / point["step_s"])
            results.append(point)
            log.info("%s %.0f s: %.3f s/step, %.0f MB", impl, seconds, point["step_s"], point["peak_mb"])
    cuda = args.device.startswith("cuda")
    where = step_bench.describe_device(torch.device(args.device), args.threads)
    print(
        f"# {date.today()} {where}, "
        f"torch {torch.__version__}, {args.config}, {args.precision}, batch {args.batch} x L s"
    )
    memory = "peak CUDA MB" if cuda else "peak RSS MB"
    print(f"| L (s) | impl | step (s) | audio-s/s | vs best reference | {memory} | vs lowest reference |")
    print("|---|---|---|---|---|---|---|")
    for seconds in args.lengths:
        rows = [r for r in results if r["seconds"] == seconds and "error" not in r]
        refs = [r for r in rows if not r["impl"].startswith("speechvq")]
        best = max((r["audio_s_per_s"] for r in refs), default=None)
        lowest = min((r["peak_mb"] for r in refs), default=None)
        for r in rows:
            speed = f"{r['audio_s_per_s'] / best:.2f}x" if best else "-"
            ratio = f"{r['peak_mb'] / lowest:.2f}x" if lowest else "-"
            print(
                f"| {seconds:g} | {r['impl']} | {r['step_s']:.3f} | {r['audio_s_per_s']:.2f} | {speed} | "
                f"{r['peak_mb']:.0f} | {ratio} |"
            )
        for r in results:
            if r["seconds"] == seconds and "error" in r:
                print(f"| {seconds:g} | {r['impl']} | failed: {r['error'][:60]} | | | | |")
    if args.json:
        meta = {"date": str(date.today()), "device": where, "threads": args.threads, "config": args.config}
        meta.update(precision=args.precision, batch=args.batch)
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    main()
