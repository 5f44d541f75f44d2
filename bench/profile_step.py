#!/usr/bin/env python3
"""Where speechvq's training step spends its time: torch.profiler, grouped by kind of work.

Usage:
    python bench/profile_step.py --config small --precision bf16
    python bench/profile_step.py --config base --precision bf16 --top 30   # + the op table
    python bench/profile_step.py --device cuda --config base --seconds 15.6 15 14 13 12 11

Profiles ``--steps`` full steps of `bench/pretrain_step.py`'s speechvq step (same batch, masking
and distractors) after two warm-up steps, and prints each group's share of the self CPU time. The
groups come from the op name and its input shapes; the rules are in :func:`group_of`. On a GPU
the shares are of the self CUDA (kernel) time, and the step's wall time is printed beside the
kernel time: where the kernels fill less of it, the GPU waits on the host (launches, syncs).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_step as step_bench  # the sibling benchmark's step functions

# mkldnn::_linear_pointwise: the fp32 linear layers and conv-encoder matmuls on oneDNN (models/kernels/linear.py)
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"}
CONVS = {"aten::mkldnn_convolution", "aten::convolution_backward"}


def group_of(name: str, shapes: str, pos_conv_kernel: int) -> str:
    """The kind of work an op (with its input shapes) belongs to."""
    if name in MATMULS:
        return "matmuls (Transformer, projections, first conv layer; in fp32 all conv layers)"
    if name in CONVS or name.startswith(
        "aten::cudnn_convolution"
    ):  # the positional conv is the only one with the pos_conv kernel
        if f", {pos_conv_kernel}]" in shapes:
            return "positional convolution, forward + backward"
        return "conv encoder convolutions, forward + backward"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention (SDPA)"
    if name in ("aten::uniform_", "aten::bernoulli_", "aten::random_"):
        return "dropout RNG"
    if "adam" in name.lower():
        return "optimizer"
    if name in ("aten::copy_", "aten::_to_copy"):
        return "copies and dtype casts"
    return "elementwise, norms, softmax, indexing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[4.0, 3.7, 3.4, 3.1])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest ops by shape")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = step_bench.bench_config(args.config)
    step_bench.no_tf32()
    x, lengths = step_bench.make_batch(args.seconds, args.device)
    cuda = x.device.type == "cuda"
    step, _ = step_bench.speechvq_step_fn(cfg, x, lengths, args.precision)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step_bench.synchronize(x.device)
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
        step_bench.synchronize(x.device)
    wall = time.perf_counter() - start
    events = prof.key_averages(group_by_input_shape=True)
    groups: collections.Counter[str] = collections.Counter()
    for event in events:
        if cuda and event.device_type != DeviceType.CPU:
            continue  # kernels: their time is in the self CUDA time of the op that launched them
        own = event.self_device_time_total if cuda else event.self_cpu_time_total
        groups[group_of(event.key, str(event.input_shapes), cfg.context.pos_conv_kernel)] += own
    total = sum(groups.values())
    where = step_bench.describe_device(x.device, args.threads)
    print(f"# {args.config}, {args.precision}, {where}, {args.steps} steps, batch {args.seconds} s")
    kind = "CUDA kernel" if cuda else "self CPU"
    print(f"# {kind} time {total / 1e6:.3f} s; wall time under the profiler {wall:.3f} s")
    print("| where | share |")
    print("|---|---|")
    for group, spent in groups.most_common():
        print(f"| {group} | {100 * spent / total:.1f}% |")
    if args.top:
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(events.table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
