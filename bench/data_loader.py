"""Data-path benchmark: loader throughput vs. `small`-model training throughput, and synth-corpus speed.

Usage:
    python bench/data_loader.py [--hours 1] [--epochs 3] [--train-steps 4] [--workdir /tmp/speechvq-bench]

Prints (and writes as JSON with --json) the decoded audio seconds per wall-clock second of the
AudioDataset + BucketBatchSampler + collate_audio DataLoader with 0 and 2 workers, the audio
seconds per second that `build_wav2vec2(preset("small"))` trains on with Adam, their ratio, and
the generation rate of `speechvq synth-corpus`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import speechvq
from speechvq.cli import main as cli
from speechvq.data import AudioDataset, BucketBatchSampler, collate_audio

SR = 16000


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=1.0, help="synthetic corpus size")
    p.add_argument("--epochs", type=int, default=3, help="loader epochs timed")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/speechvq-bench"))
    p.add_argument(
        "--max-tokens", type=int, default=320_000, help="loader and training batch budget (samples)"
    )
    p.add_argument("--max-sample-size", type=int, default=250_000)
    p.add_argument("--train-steps", type=int, default=4, help="timed training steps (after 1 warm-up)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def loader_rate(manifest: Path, workers: int, max_tokens: int, max_sample_size: int, epochs: int) -> dict:
    ds = AudioDataset(manifest, max_sample_size=max_sample_size, normalize=False)
    sampler = BucketBatchSampler(ds.sizes, max_tokens, seed=0)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=collate_audio,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    start = time.perf_counter()
    samples = batches = 0
    for epoch in range(epochs):  # worker start-up is included, amortised over the epochs
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        for batch in loader:
            samples += int(batch.lengths.sum())
            batches += 1
    elapsed = time.perf_counter() - start
    return {
        "workers": workers,
        "audio_s": samples / SR,
        "wall_s": elapsed,
        "audio_s_per_s": samples / SR / elapsed,
        "batches": batches,
    }


def train_rate(manifest: Path, steps: int, max_tokens: int, max_sample_size: int) -> dict:
    torch.manual_seed(0)
    model = speechvq.build_wav2vec2(speechvq.preset("small")).train()
    optim = torch.optim.Adam(model.parameters(), lr=5e-4)
    ds = AudioDataset(manifest, max_sample_size=max_sample_size)
    sampler = BucketBatchSampler(ds.sizes, max_tokens, seed=0)
    batches = [collate_audio([ds[i] for i in b]) for b, _ in zip(sampler, range(steps + 1))]
    timed_audio, timed = 0.0, 0.0
    for k, batch in enumerate(batches):
        start = time.perf_counter()
        out = model(batch.waveforms, batch.lengths)
        loss = model.compute_loss(out).total / max(out.num_targets, 1)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if k > 0:  # the first step warms up allocators
            timed += time.perf_counter() - start
            timed_audio += float(batch.lengths.sum()) / SR
    return {
        "steps": len(batches) - 1,
        "audio_s": timed_audio,
        "wall_s": timed,
        "audio_s_per_s": timed_audio / timed,
    }


def main() -> None:
    args = get_args()
    logging.basicConfig(level=logging.WARNING)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    corpus, manifests = args.workdir / "corpus", args.workdir / "manifests"
    start = time.perf_counter()
    cli(["synth-corpus", "--out", str(corpus), "--hours", str(args.hours), "--seed", "0", "--jobs", "2"])
    synth_wall = time.perf_counter() - start
    summary = json.loads((corpus / "summary.json").read_text())
    synth_audio = sum(summary["seconds"].values())
    cli(["prepare-librispeech", str(corpus), "--out", str(manifests)])
    manifest = manifests / "train.tsv"

    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "synth": {"audio_s": synth_audio, "wall_s": synth_wall, "x_real_time": synth_audio / synth_wall},
        "loader": [
            loader_rate(manifest, w, args.max_tokens, args.max_sample_size, args.epochs) for w in (0, 2)
        ],
        "train_small": train_rate(manifest, args.train_steps, args.max_tokens, args.max_sample_size),
    }
    train = results["train_small"]["audio_s_per_s"]
    for row in results["loader"]:
        row["x_training"] = row["audio_s_per_s"] / train
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
