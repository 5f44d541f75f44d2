"""The wav2vec 2.0 pretraining loop: one linear function on accelerate.

Loss normalisation, documented once: the model's losses are sums over masked targets. Each rank
back-propagates its raw sums for every accumulated batch; after the last one the target count N
is summed over batches and ranks, and the (DDP-averaged) gradients are multiplied by W / N, so the
update uses d(sum of all losses)/d(theta) / N whatever the split over ranks and accumulation steps.

Randomness, documented once: before each batch the global RNGs are seeded from (seed, update
attempt, global batch slot), as fairseq seeds each update. Masks, distractors, dropout and Gumbel
noise are then a function of the step and data only, which makes resume exact and makes W ranks
with accumulation A equal one rank with accumulation W * A. LayerDrop draws from its own generator
seeded from (seed, attempt) identically on every rank and batch of an update, so all ranks skip the
same blocks (DDP still needs ``find_unused_parameters`` for the skipped blocks' weights).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from speechvq.data import AudioBatch, AudioDataset, BucketBatchSampler, collate_audio
from speechvq.errors import UserInputError
from speechvq.losses import contrastive_accuracy
from speechvq.models.wav2vec2 import Wav2Vec2Model, Wav2Vec2Output, build_wav2vec2
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import PretrainConfig, dump_config
from speechvq.train.diagnostics import collapse_warnings
from speechvq.train.metrics import MetricsLogger
from speechvq.train.optim import build_optimizer, lr_at, set_lr_

logger = logging.getLogger(__name__)

# per-update sums, all-reduced in one call
_STATS = ("loss", "contrastive", "diversity", "feature_penalty", "targets", "correct", "counted",
          "code_perplexity", "prob_perplexity", "batches", "masked_frames", "frames", "samples", "nonfinite")  # fmt: skip
_I = {name: i for i, name in enumerate(_STATS)}


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


@dataclass
class RunSummary:
    """What :func:`pretrain` returns."""

    step: int
    """Updates done."""
    last_train: dict[str, float] = field(default_factory=dict)
    """The last training metric record."""
    last_valid: dict[str, float] | None = None
    """The last validation record, if any."""
    warnings: list[str] = field(default_factory=list)
    """Codes of every collapse warning that fired (see :mod:`speechvq.train.diagnostics`)."""
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss or gradient."""
    stopped_early: bool = False
    """True when the run stopped before ``max_steps`` (time budget or ``stop_at_step``)."""
    main_process: bool = True
    """Whether this process is the main one (the one that logs and writes)."""


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))


class _Batches:
    """Endless batches over epochs; counts the batches consumed in the current epoch."""

    def __init__(self, dataset: AudioDataset, sampler: BucketBatchSampler, num_workers: int) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_audio, num_workers=num_workers
        )
        self.epoch, self.consumed, self._it = sampler.epoch, 0, None

    def resume_(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.epoch, self.consumed = int(state["epoch"]), int(state["num_consumed"])

    def next(self) -> AudioBatch:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:
                self.consumed += 1
                return batch
            self._it, self.epoch, self.consumed = None, self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict(num_consumed=self.consumed)
        state["epoch"] = self.epoch
        return state


def _open_data(path: str, cfg: PretrainConfig, acc: Accelerator, *, train: bool) -> _Batches:
    d = cfg.data
    try:
        ds = AudioDataset(
            path,
            sample_rate=d.sample_rate,
            normalize=d.normalize,
            max_sample_size=d.max_sample_size,
            min_sample_size=d.min_sample_size,
            random_crop=train,
            seed=cfg.train.seed,
        )
    except FileNotFoundError as err:
        raise UserInputError(f"{path}: {err}") from err
    if len(ds) == 0:
        raise UserInputError(f"{path}: no usable utterances (check min_sample_size)")
    sampler = BucketBatchSampler(
        ds.sizes,
        d.max_tokens,
        num_replicas=acc.num_processes,
        rank=acc.process_index,
        seed=cfg.train.seed,
        shuffle=train,
        max_sample_size=d.max_sample_size,
    )
    return _Batches(ds, sampler, d.num_workers)


def _batch_stats(model: Wav2Vec2Model, out: Wav2Vec2Output, batch: AudioBatch) -> tuple[Any, torch.Tensor]:
    """(loss breakdown, ``[len(_STATS)]`` sums of this batch)."""
    losses = model.compute_loss(out)
    correct, counted = contrastive_accuracy(out.logits.detach())
    s = torch.zeros(len(_STATS), dtype=torch.float64)
    for name in ("contrastive", "diversity", "feature_penalty"):
        s[_I[name]] = float(getattr(losses, name).detach())
    s[_I["loss"]] = float(losses.total.detach())
    s[_I["targets"]] = losses.num_targets
    s[_I["correct"]], s[_I["counted"]] = float(correct), counted
    s[_I["code_perplexity"]] = float(out.quantizer.code_perplexity.detach())
    s[_I["prob_perplexity"]] = float(out.quantizer.prob_perplexity.detach())
    s[_I["batches"]] = 1
    s[_I["masked_frames"]], s[_I["frames"]] = float(out.mask.sum()), float(out.lengths.sum())
    s[_I["samples"]] = float(batch.lengths.sum())
    s[_I["nonfinite"]] = 0.0 if math.isfinite(s[_I["loss"]]) else 1.0
    return losses, s


def _record(s: torch.Tensor) -> dict[str, float]:
    """Per-target losses (nats and bits), accuracy, mean perplexities, masked fraction."""
    n = max(float(s[_I["targets"]]), 1.0)
    b = max(float(s[_I["batches"]]), 1.0)
    rec = {name: float(s[_I[name]]) / n for name in ("loss", "contrastive", "diversity", "feature_penalty")}
    rec["loss_bits"] = rec["loss"] / math.log(2)
    rec["contrastive_bits"] = rec["contrastive"] / math.log(2)
    rec["accuracy"] = float(s[_I["correct"]]) / max(float(s[_I["counted"]]), 1.0)
    rec["code_perplexity"] = float(s[_I["code_perplexity"]]) / b
    rec["prob_perplexity"] = float(s[_I["prob_perplexity"]]) / b
    rec["masked_fraction"] = float(s[_I["masked_frames"]]) / max(float(s[_I["frames"]]), 1.0)
    rec["targets_per_update"] = n
    return rec


def _code_counts(out: Wav2Vec2Output, num_codebooks: int, codebook_size: int) -> torch.Tensor:
    """``[G, V]`` how often each entry was picked over the valid frames."""
    codes = out.quantizer.codes.detach()  # (B, T, G)
    valid = torch.arange(codes.size(1), device=codes.device)[None, :] < out.lengths[:, None]
    picked = codes[valid]  # (B, T, G) -> (n, G)
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    counts = torch.bincount((picked + offsets).reshape(-1), minlength=num_codebooks * codebook_size)
    return counts.view(num_codebooks, codebook_size).cpu()


@torch.no_grad()
def evaluate(model: Wav2Vec2Model, data: _Batches, acc: Accelerator, seed: int) -> dict[str, float]:
    """Validation loss per target etc. over one pass of ``data`` (eval mode, fixed masks)."""
    model.eval()
    sums = torch.zeros(len(_STATS), dtype=torch.float64)
    data.sampler.set_epoch(0)
    for i, batch in enumerate(data.loader):
        if len(batch) == 0:
            continue
        torch.manual_seed(_seed_for(seed, 1_000_003, i, acc.process_index))
        batch = batch.to(acc.device)
        with acc.autocast():
            out = model(batch.waveforms, batch.lengths)
        sums += _batch_stats(model, out, batch)[1]
    model.train()
    return _record(acc.reduce(sums.to(acc.device), "sum").cpu())


def pretrain(
    cfg: PretrainConfig,
    exp_dir: str | Path,
    *,
    require_resume: bool = False,
    model: Wav2Vec2Model | None = None,
    stop_at_step: int | None = None,
) -> RunSummary:
    """Pretrain (or resume) a wav2vec 2.0 model as ``cfg`` says, writing into ``exp_dir``.

    Args:
        cfg: the validated run config.
        exp_dir: experiment directory; if it holds checkpoints the run resumes from the newest.
        require_resume: raise if there is no checkpoint to resume from.
        model: train this model instead of building one from ``cfg`` (tests).
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.

    Returns:
        A :class:`RunSummary`.
    """
    try:
        return _pretrain(cfg, Path(exp_dir), require_resume, model, stop_at_step)
    finally:
        # accelerate's state is a process-wide singleton; a single-process run (tests, notebooks)
        # releases it so that the next run may choose another precision
        if not torch.distributed.is_initialized():
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _pretrain(
    cfg: PretrainConfig,
    exp_dir: Path,
    require_resume: bool,
    model: Wav2Vec2Model | None,
    stop_at_step: int | None,
) -> RunSummary:
    t = cfg.train
    model_cfg = cfg.model_config()
    if t.precision == "fp16" and (t.cpu or not torch.cuda.is_available()):
        raise UserInputError("`train.precision` must be fp32 or bf16 on the CPU, but is fp16 instead.")
    unused = model_cfg.context.layer_drop_p > 0 or model_cfg.encoder.grad_mult == 0
    acc = Accelerator(
        mixed_precision={"fp32": "no"}.get(t.precision, t.precision),
        # without a GPU accelerate only forms a multi-process (gloo) group when told it runs on the CPU
        cpu=t.cpu or not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    ckpt_dir = exp_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(ckpt_dir)
    if require_resume and resume_from is None:
        raise UserInputError(f"{ckpt_dir}: --resume given, but there is no checkpoint to resume from")
    config_yaml = dump_config(cfg)
    if resume_from is not None:
        saved = yaml.safe_load((resume_from / "config.yaml").read_text())
        if saved["model"]["config"] != model_cfg.to_dict():
            raise UserInputError(f"{resume_from}/config.yaml: the model config differs from the one given")
    if main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.yaml").write_text(config_yaml)

    # model, optimizer, data
    torch.manual_seed(t.seed)
    if model is None:
        model = build_wav2vec2(model_cfg)
    state: dict[str, Any] = {}
    if resume_from is not None:
        weights, state = ckpt.load_checkpoint(resume_from)
        model.load_state_dict(weights)
        logger.info("resuming from %s (step %d)", resume_from, state["step"])
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    data = _open_data(cfg.data.train, cfg, acc, train=True)
    valid = _open_data(cfg.data.valid, cfg, acc, train=False) if cfg.data.valid else None
    step, attempt, skipped, in_a_row = 0, 0, 0, 0
    best = ckpt.read_best(ckpt_dir)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        try:
            data.resume_(state["sampler"])
        except ValueError as err:
            raise UserInputError(
                f"{resume_from}: the saved data position does not fit the current data (were data.* "
                f"settings or the manifest changed?): {err}"
            ) from err
        step, attempt, skipped = state["step"], state["attempt"], state["skipped"]
        ckpt.set_rng_state_(state["rng"][rank % len(state["rng"])])

    def save(valid_loss: float | None = None) -> None:
        rngs = gather_object([ckpt.rng_state()]) if world > 1 else [ckpt.rng_state()]
        if main:
            train_state = {
                "step": step,
                "attempt": attempt,
                "skipped": skipped,
                "optimizer": optimizer.state_dict(),
                "scheduler": {"name": cfg.schedule.name, "step": step},
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "sampler": data.state_dict(),
                "rng": rngs,
            }
            ckpt.save_checkpoint(
                ckpt_dir, step, weights=model.state_dict(), state=train_state, config_yaml=config_yaml,
                valid_loss=valid_loss,
            )  # fmt: skip
            if valid_loss is not None and (best is None or valid_loss < best["valid_loss"]):
                ckpt.write_best(ckpt_dir, step, valid_loss)
            ckpt.rotate_checkpoints(ckpt_dir, t.keep_last)
        acc.wait_for_everyone()

    metrics = MetricsLogger(exp_dir, tensorboard=t.tensorboard) if main else None
    summary = RunSummary(step=step, skipped_steps=skipped, main_process=main)
    history: list[dict[str, float]] = []
    interval = torch.zeros(len(_STATS), dtype=torch.float64)
    grad_norms: list[float] = []
    usage = torch.zeros(
        model_cfg.quantizer.num_codebooks, model_cfg.quantizer.codebook_size, dtype=torch.long
    )
    bar = tqdm(total=t.max_steps, initial=step, disable=not (main and t.progress_bar), desc="pretrain")
    start_time = tick = time.monotonic()
    last_stop = min(t.max_steps, stop_at_step if stop_at_step is not None else t.max_steps)

    while step < last_stop:
        lr = lr_at(step, cfg.optim.lr, t.max_steps, cfg.schedule)
        set_lr_(optimizer, lr)
        model.set_num_updates_(step)  # Gumbel temperature from the update count
        sums = torch.zeros(len(_STATS), dtype=torch.float64)
        for micro in range(t.grad_accum):
            batch = data.next()
            while len(batch) == 0:  # every item of the batch failed to load (logged by the dataset)
                batch = data.next()
            batch = batch.to(acc.device)
            torch.manual_seed(_seed_for(t.seed, attempt, micro * world + rank))
            layer_drop_gen = torch.Generator().manual_seed(_seed_for(t.seed, attempt, 7))
            last = micro == t.grad_accum - 1
            with contextlib.nullcontext() if last else acc.no_sync(ddp_model):
                out = ddp_model(batch.waveforms, batch.lengths, layer_drop_generator=layer_drop_gen)
                losses, s = _batch_stats(model, out, batch)
                acc.backward(losses.total)
            sums += s
            if main:
                usage += _code_counts(
                    out, model_cfg.quantizer.num_codebooks, model_cfg.quantizer.codebook_size
                )

        # normalise by the targets of all batches on all ranks, clip, step (or skip)
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        if acc.scaler is not None:
            acc.unscale_gradients()
        scale = world / max(float(sums[_I["targets"]]), 1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = sums[_I["nonfinite"]] == 0 and math.isfinite(grad_norm)
        if finite or acc.scaler is not None:
            optimizer.step()  # under fp16 the scaler itself skips an overflowing step
        optimizer.zero_grad(set_to_none=True)
        attempt += 1
        if not finite:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            logger.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, in_a_row
            )
            if in_a_row >= t.max_nonfinite:
                raise NonFiniteError(
                    f"{in_a_row} updates in a row had a non-finite loss or gradient (at step {step}); "
                    "stopping. Lower optim.lr, raise schedule.warmup_steps, or use train.precision=bf16/fp32."
                )
            continue
        in_a_row = 0
        step += 1
        interval += sums
        grad_norms.append(grad_norm)
        bar.update(1)

        if step % t.log_interval == 0 or step == last_stop:
            now = time.monotonic()
            rec = _record(interval)
            rec.update(
                grad_norm=float(np.mean(grad_norms)),
                lr=lr,
                temperature=float(out.quantizer.temperature),
                audio_s_per_s=float(interval[_I["samples"]]) / cfg.data.sample_rate / max(now - tick, 1e-9),
                skipped_steps=skipped,
                step=step,
            )
            history.append(rec)
            summary.last_train = rec
            for w in collapse_warnings(
                history, num_negatives=model_cfg.loss.num_negatives,
                num_codebooks=model_cfg.quantizer.num_codebooks, cfg=cfg.diagnostics,
            ):  # fmt: skip
                if main:
                    logger.warning("step %d: possible collapse [%s]: %s", step, w.code, w.message)
                if w.code not in summary.warnings:
                    summary.warnings.append(w.code)
            if metrics is not None:
                metrics.log("train", step, rec)
                usage_path = exp_dir / "codebook_usage.json"
                usage_path.write_text(yaml.safe_dump({"step": step, "counts": usage.tolist()}))
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    acc=f"{rec['accuracy']:.3f}",
                    ppl=f"{rec['code_perplexity']:.1f}",
                )
            interval.zero_()
            usage.zero_()
            grad_norms.clear()
            tick = time.monotonic()

        out_of_time = t.max_wall_s is not None and time.monotonic() - start_time > t.max_wall_s
        stop = bool(acc.reduce(torch.tensor(float(out_of_time), device=acc.device), "sum") > 0)
        valid_loss = None
        if valid is not None and (step % t.valid_interval == 0 or step == t.max_steps):
            vrec = evaluate(model, valid, acc, t.seed)
            valid_loss = vrec["loss"]
            summary.last_valid = vrec
            if metrics is not None:
                metrics.log("valid", step, vrec)
            logger.info("step %d: valid loss %.4f, accuracy %.3f", step, vrec["loss"], vrec["accuracy"])
        if valid_loss is not None or step % t.save_interval == 0 or step == last_stop or stop:
            save(valid_loss)
            best = ckpt.read_best(ckpt_dir)
        if stop:
            logger.info("step %d: time budget of %.0f s spent, stopping", step, t.max_wall_s)
            break

    bar.close()
    if metrics is not None:
        metrics.close()
    summary.step, summary.skipped_steps = step, skipped
    summary.stopped_early = step < t.max_steps
    return summary
