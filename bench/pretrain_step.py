#!/usr/bin/env python3
"""Full pretraining step (forward, backward, Adam) of speechvq vs transformers vs fairseq.

Usage:
    python bench/pretrain_step.py --configs small base --precisions fp32 bf16
    python bench/pretrain_step.py --configs small --memory        # + peak RSS per implementation
    python bench/pretrain_step.py --device cuda --seconds 15 14 ... --memory   # peak CUDA memory

Each is driven as its own training code drives it; the optimizer is torch's Adam for the
references (faster on the CPU than fairseq's own FairseqAdam) and speechvq's trainer's fused AdamW
(weight decay 0, the same update) for speechvq.

The three implementations get the same architecture, the same weights where they can be mapped
(speechvq -> transformers through the key map; fairseq is built from the equivalent config), the
same padded batch (utterances of differing lengths), the same masking (mask_prob 0.65, spans of
10, min 2 spans), K=100 distractors, LayerDrop off, encoder gradient scale 1. They are timed
alternately, step by step, in one process, so that machine load affects them alike.

transformers is driven the way its pretraining example drives it: `_compute_mask_indices` and
`_sample_negative_indices` (numpy, in its data collator) then `model(**batch)`, loss divided by
the number of masked frames. The collator time is reported separately and NOT counted in the
step (in the example it runs in DataLoader workers). fairseq (if importable) runs its
`Wav2Vec2Model` + the wav2vec criterion's loss terms.

Achieved FLOP/s come from `torch.utils.flop_counter` over one step, as a fraction of this
machine's matmul peak measured in the same run and precision.

On a GPU (``--device cuda``) the step ends with a device synchronisation before the clock is read,
fp32 is true fp32 (TF32 off for matmuls and cuDNN convolutions), and ``--memory`` reports the peak
CUDA memory allocated (model, optimizer state and activations) in a fresh process per implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date

import torch

from speechvq import build_wav2vec2, preset

log = logging.getLogger("bench")
SAMPLE_RATE = 16000


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small", "base"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--impls", nargs="+", default=["speechvq", "transformers", "fairseq"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[4.0, 3.7, 3.4, 3.1])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS (one subprocess each)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--single", nargs=3, metavar=("IMPL", "CONFIG", "PRECISION"), help=argparse.SUPPRESS)
    return parser.parse_args()


def bench_config(name: str):
    cfg = preset(name)
    cfg.context.layer_drop_p = 0.0
    cfg.encoder.grad_mult = 1.0
    cfg.mask.min_masks = 2
    cfg.loss.num_negatives = 100
    return cfg


def make_batch(seconds: list[float], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([int(s * SAMPLE_RATE) for s in seconds])
    x = torch.randn(len(seconds), int(lengths.max()), generator=g) * 0.1
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0.0
    return x.to(device), lengths.to(device)


def autocast(precision: str, device_type: str):
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one step per implementation -------------------------------------------------------------


def speechvq_step_fn(cfg, x, lengths, precision: str) -> tuple[Callable[[], float], torch.nn.Module]:
    from speechvq.train.config import OptimSection
    from speechvq.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_wav2vec2(cfg).train().to(x.device)
    # speechvq's trainer's optimizer (fused AdamW); with weight decay 0 it is the references' Adam
    optim = build_optimizer(model, OptimSection(lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0))
    counter = iter(range(10**9))

    def step() -> float:
        # one generator per utterance, as the trainer draws masks, distractors and Gumbel noise,
        # and the last block at the masked frames only, as the trainer runs it
        k = next(counter)
        gens = [torch.Generator(device=x.device).manual_seed(1000 * k + i) for i in range(x.size(0))]
        optim.zero_grad(set_to_none=True)
        with autocast(precision, x.device.type):
            out = model(x, lengths, generator=gens, masked_only=True)
            loss = model.compute_loss(out)
        (loss.total / loss.num_targets).backward()
        optim.step()
        return float(loss.contrastive.detach()) / loss.num_targets

    return step, model


def transformers_step_fn(cfg, x, lengths, precision: str):
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    from speechvq.interop.hf import to_hf

    torch.manual_seed(0)
    hf = to_hf(build_wav2vec2(cfg)).train().to(x.device)
    optim = torch.optim.Adam(hf.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    attention = (torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]).long()
    collate_times: list[float] = []

    def collate() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        frames = int(hf._get_feat_extract_output_lengths(x.size(1)))
        sub_attention = hf._get_feature_vector_attention_mask(frames, attention)
        mask = _compute_mask_indices(
            (x.size(0), frames),
            cfg.mask.mask_prob,
            cfg.mask.mask_length,
            attention_mask=sub_attention.cpu(),
            min_masks=cfg.mask.min_masks,
        )
        negatives = _sample_negative_indices((x.size(0), frames), cfg.loss.num_negatives, mask)
        batch = {
            "input_values": x,
            "attention_mask": attention,
            "mask_time_indices": torch.tensor(mask, dtype=torch.long, device=x.device),
            "sampled_negative_indices": torch.tensor(negatives, dtype=torch.long, device=x.device),
        }
        collate_times.append(time.perf_counter() - start)
        return batch

    pending = [collate()]

    def step() -> float:
        batch = pending.pop()
        optim.zero_grad(set_to_none=True)
        with autocast(precision, x.device.type):
            out = hf(**batch)
        num = int(batch["mask_time_indices"].sum())
        (out.loss / num).backward()
        optim.step()
        pending.append(collate())  # next batch, outside the timed region of the next step
        return float(out.contrastive_loss.detach()) / num

    step.collate_times = collate_times  # type: ignore[attr-defined]
    return step, hf


def fairseq_step_fn(cfg, x, lengths, precision: str):
    import torch.nn.functional as F
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config as FSConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model as FSModel

    e, c, q = cfg.encoder, cfg.context, cfg.quantizer
    fs_cfg = FSConfig(
        extractor_mode="layer_norm" if e.norm_mode == "layer_norm" else "default",
        conv_feature_layers=str([tuple(spec) for spec in e.conv_layers]),
        conv_bias=e.conv_bias,
        encoder_layers=c.num_layers,
        encoder_embed_dim=c.dim,
        encoder_ffn_embed_dim=c.ffn_dim,
        encoder_attention_heads=c.num_heads,
        layer_norm_first=c.layer_norm_first,
        conv_pos=c.pos_conv_kernel,
        conv_pos_groups=c.pos_conv_groups,
        dropout=c.dropout_p,
        attention_dropout=c.attention_dropout_p,
        activation_dropout=c.activation_dropout_p,
        encoder_layerdrop=0.0,
        dropout_input=cfg.feature_dropout_p,
        dropout_features=cfg.feature_dropout_p,
        final_dim=cfg.final_dim,
        latent_vars=q.codebook_size,
        latent_groups=q.num_codebooks,
        latent_dim=q.codevector_dim,
        latent_temp=q.temperature,
        mask_prob=cfg.mask.mask_prob,
        mask_length=cfg.mask.mask_length,
        mask_min_space=0,
        num_negatives=cfg.loss.num_negatives,
        cross_sample_negatives=0,
        logit_temp=cfg.loss.logit_temp,
        feature_grad_mult=e.grad_mult,
        quantize_targets=True,  # fairseq's default is False: without it there is no quantizer
    )
    # fairseq writes its fp32 mask embedding into bf16 activations with index_put, which fails
    # under autocast ("Index put requires the source and destination dtypes match"); cast it.
    import fairseq.models.wav2vec.wav2vec2 as fs_w2v2

    if not getattr(fs_w2v2.index_put, "_bench_cast", False):
        original = fs_w2v2.index_put

        def index_put(tensor, indices, value):
            return original(tensor, indices, value.to(tensor.dtype) if torch.is_tensor(value) else value)

        index_put._bench_cast = True  # type: ignore[attr-defined]
        fs_w2v2.index_put = index_put
    torch.manual_seed(0)
    model = FSModel(fs_cfg).train().to(x.device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    padding = torch.arange(x.size(1), device=x.device)[None, :] >= lengths[:, None]

    def step() -> float:
        optim.zero_grad(set_to_none=True)
        with autocast(precision, x.device.type):
            out = model(source=x, padding_mask=padding)
            logits = model.get_logits(out).float()
            target = model.get_targets(None, out).long()
            loss = F.cross_entropy(logits, target, reduction="sum")
            n = target.numel()
            extra = model.get_extra_losses(out)
            loss = loss + 0.1 * extra[0].float() * n + cfg.loss.feature_penalty_weight * extra[1].float() * n
        (loss / n).backward()
        optim.step()
        return float(F.cross_entropy(logits.detach(), target, reduction="mean"))

    return step, model


STEP_FNS = {"speechvq": speechvq_step_fn, "transformers": transformers_step_fn, "fairseq": fairseq_step_fn}


def available(impl: str) -> bool:
    if impl == "fairseq":
        try:
            import fairseq.models.wav2vec.wav2vec2  # noqa: F401
        except Exception as err:  # fairseq is optional and often broken
            log.warning("fairseq not available (%s): skipped", err)
            return False
    return True


# --- measurement -----------------------------------------------------------------------------


def matmul_peak(precision: str, device: torch.device, reps: int = 10) -> float:
    """This machine's matmul rate in this precision: the faster of torch's ``mm`` and, on the CPU,
    oneDNN's matmul. For fp32 on an AMD CPU ``mm`` is MKL's AVX2 code (200 GFLOP/s on the 2-core
    Zen 5 CPU of docs/performance.md) and oneDNN's AVX-512 code twice as fast; bf16 ``mm`` already
    runs on oneDNN."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    products = [lambda: a @ b]
    if device.type == "cpu":
        from speechvq.models.kernels.linear import matmul_nt

        products.append(lambda: matmul_nt(a, b))  # oneDNN's for fp32 on x86 (a @ b^T: same FLOPs)
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            product()
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def count_flops(step: Callable[[], float]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def peak_memory_subprocess(impl: str, config: str, precision: str, args: argparse.Namespace) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--single",
        impl,
        config,
        precision,
        "--seconds",
        *map(str, args.seconds),
    ]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def run_single(impl: str, config: str, precision: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    no_tf32()
    x, lengths = make_batch(args.seconds, args.device)
    step, _ = STEP_FNS[impl](bench_config(config), x, lengths, precision)
    for _ in range(3):
        step()
    print(json.dumps({"peak_mb": peak_memory_mb(x.device)}))


def no_tf32() -> None:
    """fp32 is true fp32 on a GPU, also in bf16 autocast's fp32 islands: no TF32 in matmuls or
    cuDNN convolutions (cuDNN allows it by default), the same for every implementation."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: CUDA memory allocated on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def describe_device(device: torch.device, threads: int) -> str:
    """The GPU's name, or the CPU and its thread count, for the results' header."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {threads} threads"


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to the address space created by exec;
    ``ru_maxrss`` is carried across exec on Linux, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    args = get_args()
    if args.single:
        run_single(*args.single, args)
        return
    torch.set_num_threads(args.threads)
    impls = [i for i in args.impls if available(i)]
    x, lengths = make_batch(args.seconds, args.device)
    device = x.device
    audio_seconds = float(lengths.sum()) / SAMPLE_RATE
    results = []
    for config in args.configs:
        for precision in args.precisions:
            no_tf32()
            peak = matmul_peak(precision, device)
            steps = {impl: STEP_FNS[impl](bench_config(config), x, lengths, precision)[0] for impl in impls}
            flops = {impl: count_flops(fn) for impl, fn in steps.items()}
            for _ in range(args.warmup):
                for fn in steps.values():
                    fn()
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            for _ in range(args.steps):
                for impl, fn in steps.items():
                    synchronize(device)
                    start = time.perf_counter()
                    fn()
                    synchronize(device)
                    times[impl].append(time.perf_counter() - start)
            for impl in impls:
                t = statistics.median(times[impl])
                row = {
                    "config": config,
                    "precision": precision,
                    "impl": impl,
                    "step_s": t,
                    "step_times_s": times[impl],  # in round order: the impls alternate within a round
                    "audio_s_per_s": audio_seconds / t,
                    "gflop_per_step": flops[impl] / 1e9,
                    "achieved_gflops": flops[impl] / t / 1e9,
                    "peak_gflops": peak / 1e9,
                    "fraction_of_peak": flops[impl] / t / peak,
                }
                collate = getattr(steps[impl], "collate_times", None)
                if collate:
                    row["collate_s"] = statistics.median(collate)
                if args.memory:
                    key = "peak_cuda_mb" if device.type == "cuda" else "peak_rss_mb"
                    row[key] = peak_memory_subprocess(impl, config, precision, args)
                results.append(row)
    fastest_ref: dict[tuple[str, str], float] = {}
    for r in results:
        if r["impl"] != "speechvq":
            key = (r["config"], r["precision"])
            fastest_ref[key] = max(fastest_ref.get(key, 0.0), r["audio_s_per_s"])
    where = describe_device(device, args.threads)
    print(
        f"# {date.today()} {where}, torch {torch.__version__}, "
        f"batch {args.seconds} s ({audio_seconds:.1f} s of audio)"
    )
    memory = "peak CUDA MB" if device.type == "cuda" else "peak RSS MB"
    print(
        f"| config | precision | impl | audio-s/s | vs best reference | GFLOP/step | % of matmul peak | {memory} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ref = fastest_ref.get((r["config"], r["precision"]))
        ratio = f"{r['audio_s_per_s'] / ref:.2f}x" if ref else "-"
        mem = r.get("peak_cuda_mb", r.get("peak_rss_mb"))
        rss = f"{mem:.0f}" if mem is not None else "-"
        print(
            f"| {r['config']} | {r['precision']} | {r['impl']} | {r['audio_s_per_s']:.2f} | {ratio} | "
            f"{r['gflop_per_step']:.0f} | {100 * r['fraction_of_peak']:.1f}% of {r['peak_gflops']:.0f} | {rss} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": str(date.today()),
                    "device": where,
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "seconds": args.seconds,
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    main()
