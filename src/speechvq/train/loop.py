"""The training loop: one linear function on accelerate, over a :class:`~speechvq.train.tasks.base.Task`.

wav2vec 2.0 and vq-wav2vec pretraining, CTC fine-tuning and unit-BERT pretraining all run here;
what differs between them (model, data, loss, metrics, validation score, export) is the task,
which the caller builds (:mod:`speechvq.train.tasks`): this module imports no model.

Loss normalisation, documented once: a task's loss is a sum over its targets (masked frames for
wav2vec 2.0 and BERT, utterances for CTC). Each rank back-propagates its raw sums for every
accumulated batch; after the last one the target count N is summed over batches and ranks, and the
(DDP-averaged) gradients are multiplied by W / N, so the update uses d(sum of all losses)/d(theta)
/ N whatever the split over ranks and accumulation steps.

Randomness, documented once: before each batch the global RNGs are seeded from (seed, update
attempt, global batch slot), as fairseq seeds each update (dropout draws from them), and the task
gets a generator seeded the same way. The task also gets a generator seeded from (seed, attempt)
identically on every rank and batch of an update: wav2vec 2.0 pretraining draws LayerDrop from it,
so all ranks skip the same blocks (DDP still needs ``find_unused_parameters`` for the skipped
blocks' weights), and derives from its seed one generator per utterance (with the utterance's
dataset index) for masks, distractors and Gumbel noise. Everything is a function of the step and
the data only, which makes resume exact; with per-utterance draws and cross-process batch
statistics (see :meth:`~speechvq.models.wav2vec2.Wav2Vec2Model.set_cross_process_sum_`), W ranks
with batch b equal one rank with batch W * b apart from dropout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tqdm.contrib.logging import logging_redirect_tqdm

from speechvq import signals
from speechvq.train import checkpoint as ckpt
from speechvq.train.batches import Batches, NoUsableDataError, describe_skips, skip_counts
from speechvq.train.lock import experiment_lock
from speechvq.train.optim import lr_at, set_lr_
from speechvq.train.run import (
    RunState,
    RunSummary,
    accelerator_for,
    metric_line,
    save_checkpoint,
    setup_run,
)
from speechvq.train.tasks.base import Task

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sums(names: tuple[str, ...], stats: dict[str, float]) -> torch.Tensor:
    return torch.tensor([float(stats.get(n, 0.0)) for n in names], dtype=torch.float64)


@torch.no_grad()
def evaluate(
    task: Task, model: torch.nn.Module, data: Batches, acc: Accelerator, seed: int
) -> tuple[dict[str, float], float]:
    """(validation record, score) over one pass of ``data`` (eval mode, fixed randomness).

    Raises:
        NoUsableDataError: not one validation item (on any process) could be used: a score of
            nothing (WER 0 of 0 words) must not pick the best checkpoint.
    """
    model.eval()
    sums = torch.zeros(len(task.eval_stat_names) + 1, dtype=torch.float64)  # + items evaluated
    data.sampler.set_epoch(0)
    for i, batch in enumerate(data.loader):
        if len(batch) == 0:
            continue
        torch.manual_seed(_seed_for(seed, 1_000_003, i, acc.process_index))
        with acc.autocast():
            stats = task.eval_batch(model, batch.to(acc.device))
        sums[:-1] += _sums(task.eval_stat_names, stats)
        sums[-1] += len(batch)
    model.train()
    sums = acc.reduce(sums.to(acc.device), "sum").cpu()
    if sums[-1] == 0:
        raise NoUsableDataError(
            f"{data.name}: no validation item could be used ({len(data.dataset)} items on this process; "
            f"skipped: {describe_skips(skip_counts(data.dataset))}); fix the validation data or drop it"
        )
    return task.eval_record(dict(zip(task.eval_stat_names, sums[:-1].tolist())))


def train(
    task: Task,
    cfg: Any,
    exp_dir: str | Path,
    *,
    require_resume: bool = False,
    stop_at_step: int | None = None,
) -> RunSummary:
    """Train (or resume) ``task`` with the loop settings of ``cfg``, writing into ``exp_dir``.

    Args:
        task: what to train (see :class:`~speechvq.train.tasks.base.Task`).
        cfg: a config with ``train`` (:class:`~speechvq.train.config.TrainSection`), ``optim``,
            ``schedule`` and ``data`` (``train``, ``valid``, ``num_workers``) sections.
        exp_dir: experiment directory; if it holds checkpoints the run resumes from the newest.
        require_resume: raise if there is no checkpoint to resume from.
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.

    Returns:
        A :class:`RunSummary`.
    """
    try:
        # one run per experiment directory; log lines above the progress bar, not through it;
        # SIGTERM/SIGINT end the run cleanly
        with experiment_lock(exp_dir), _log_above_bar(), signals.stop_on_signals() as request:
            return _train(task, cfg, Path(exp_dir), require_resume, stop_at_step, request)
    finally:
        # accelerate's state is a process-wide singleton; a single-process run (tests, notebooks)
        # releases it so that the next run may choose another precision
        if not torch.distributed.is_initialized():
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _log_above_bar() -> contextlib.AbstractContextManager[Any]:
    """tqdm's logging redirection (log lines above the bar) where the root logger prints to the
    console; elsewhere (tests, a library caller without logging set up) nothing, since tqdm would
    add a console handler of its own."""
    console = any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
        for h in logging.root.handlers
    )
    return logging_redirect_tqdm() if console else contextlib.nullcontext()


def _train(
    task: Task,
    cfg: Any,
    exp_dir: Path,
    require_resume: bool,
    stop_at_step: int | None,
    request: signals.StopRequest | None = None,
) -> RunSummary:
    """Set up (or resume), then update until done, logging, validating and checkpointing on the way."""
    t = cfg.train
    run = setup_run(task, cfg, exp_dir, accelerator_for(task, t), require_resume)
    last_stop = min(t.max_steps, stop_at_step if stop_at_step is not None else t.max_steps)
    stop = False  # set when the time budget (or a signal) ends the run
    while run.step < last_stop:
        lr = lr_at(run.step, cfg.optim.lr, t.max_steps, cfg.schedule)
        set_lr_(run.optimizer, lr)
        task.on_update(run.model, run.step)
        sums = _accumulate(run)
        grad_norm, finite = _apply_update(run, sums)
        if not finite:
            _count_skipped(run)
            continue
        run.in_a_row = 0
        run.step += 1
        run.interval += sums
        run.grad_norms.append(grad_norm)
        run.bar.update(1)
        if run.step % t.log_interval == 0 or run.step == last_stop:
            _log_interval(run, lr)
        stop, signalled, received = _stop_flags(run, request)
        score = (
            _validate(run)
            if run.valid is not None and (run.step % t.valid_interval == 0 or run.step == t.max_steps)
            else None
        )
        if score is not None or run.step % t.save_interval == 0 or run.step == last_stop or stop:
            save_checkpoint(run, score)
        if signalled:
            _stopped_by_signal(run, request if received else None)
            break
        if stop:
            logger.info("step %d: time budget of %.0f s spent, stopping", run.step, t.max_wall_s)
            break
    # the run is over (all updates done, or its time budget spent; not a simulated interruption)
    finished = run.step >= t.max_steps or (stop_at_step is None and stop and run.summary.stopped_by is None)
    return _finish(run, finished)


def _accumulate(run: RunState) -> torch.Tensor:
    """Forward and backward over the ``train.grad_accum`` batches of one update, each batch slot
    seeded from (seed, attempt, slot); returns the statistics summed over batches and ranks."""
    t, acc, task = run.cfg.train, run.acc, run.task
    sums = torch.zeros(len(task.stat_names), dtype=torch.float64)
    for micro in range(t.grad_accum):
        batch = run.data.next().to(acc.device)
        slot_seed = _seed_for(t.seed, run.attempt, micro * run.world + acc.process_index)
        torch.manual_seed(slot_seed)
        last = micro == t.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.ddp_model):
            loss, stats = task.batch_loss(
                run.ddp_model, run.model, batch, generator=_generator(slot_seed),
                update_generator=_generator(_seed_for(t.seed, run.attempt, 7)),
            )  # fmt: skip
            acc.backward(loss)
        sums += _sums(task.stat_names, stats)
    return acc.reduce(sums.to(acc.device), "sum").cpu()


def _apply_update(run: RunState, sums: torch.Tensor) -> tuple[float, bool]:
    """Normalise the gradients by the targets of all batches on all ranks, clip, step (unless the
    loss or gradient is not finite); returns (gradient norm, finite)."""
    names, acc, params = run.task.stat_names, run.acc, run.params
    if acc.scaler is not None:
        acc.unscale_gradients()
    scale = run.world / max(float(sums[names.index("targets")]), 1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    clip = run.cfg.optim.clip_grad_norm
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
    finite = bool(sums[names.index("nonfinite")] == 0) and math.isfinite(grad_norm)
    if finite or acc.scaler is not None:
        run.optimizer.step()  # under fp16 the scaler itself skips an overflowing step
    run.optimizer.zero_grad(set_to_none=True)
    run.attempt += 1
    return grad_norm, finite


def _count_skipped(run: RunState) -> None:
    """A skipped update: warn, and stop after ``train.max_nonfinite`` in a row."""
    run.skipped, run.in_a_row = run.skipped + 1, run.in_a_row + 1
    logger.warning(
        "step %d: non-finite loss or gradient, update skipped (%d in a row)", run.step, run.in_a_row
    )
    if run.in_a_row >= run.cfg.train.max_nonfinite:
        raise NonFiniteError(
            f"{run.in_a_row} updates in a row had a non-finite loss or gradient (at step {run.step}); "
            "stopping. Lower optim.lr, raise schedule.warmup_steps, or use train.precision=bf16/fp32."
        )


def _log_interval(run: RunState, lr: float) -> None:
    """The training record of the updates since the last one, with the task's warnings."""
    names, step, summary = run.task.stat_names, run.step, run.summary
    interval_sums = dict(zip(names, run.interval.tolist()))
    rec = run.task.record(interval_sums)
    rec.update(grad_norm=float(np.mean(run.grad_norms)), lr=lr, skipped_steps=run.skipped, step=step)
    for code, message in run.task.on_log(step, rec, interval_sums, time.monotonic() - run.tick, run.main):
        if run.main:
            logger.warning("step %d: possible collapse [%s]: %s", step, code, message)
        if code not in summary.warnings:
            summary.warnings.append(code)
    summary.last_train = rec
    if run.metrics is not None:
        run.metrics.log("train", step, rec)
        run.bar.set_postfix(loss=f"{rec['loss']:.3f}")
        logger.info("step %d/%d: %s", step, run.cfg.train.max_steps, metric_line(rec))
    run.interval.zero_()
    run.grad_norms.clear()
    run.tick = time.monotonic()


def _stop_flags(run: RunState, request: signals.StopRequest | None) -> tuple[bool, bool, bool]:
    """(stop, stopped by a signal on any rank, a signal received here), agreed by every rank, so
    that all of them stop after the same update."""
    max_wall_s = run.cfg.train.max_wall_s
    out_of_time = max_wall_s is not None and time.monotonic() - run.start_time > max_wall_s
    # a signal on any rank: finish this update, save, stop (all ranks at the same update)
    received = request is not None and request.requested
    flags = run.acc.reduce(torch.tensor([float(out_of_time), float(received)], device=run.acc.device), "sum")
    return bool(flags.sum() > 0), bool(flags[1] > 0), received


def _validate(run: RunState) -> float:
    """Evaluate on the validation data, record it; returns the score."""
    assert run.valid is not None
    valid, summary = run.valid, run.summary
    vrec, score = evaluate(run.task, run.model, valid, run.acc, run.cfg.train.seed)
    skipped_valid = skip_counts(valid.dataset)
    if run.main and skipped_valid and not summary.skipped_valid_items:
        logger.warning(
            "%s: %d of %d validation items skipped (%s); the scores cover the others",
            valid.name, sum(skipped_valid.values()), len(valid.dataset), describe_skips(skipped_valid),
        )  # fmt: skip
    summary.skipped_valid_items = skipped_valid
    summary.last_valid = vrec
    if run.metrics is not None:
        run.metrics.log("valid", run.step, vrec)
    logger.info("step %d: validation %s", run.step, ", ".join(f"{k} {v:.4g}" for k, v in vrec.items()))
    return score


def _stopped_by_signal(run: RunState, request: signals.StopRequest | None) -> None:
    """Record and log the signal (this rank's, else SIGTERM from another rank) that stops the run."""
    run.summary.stopped_by = request.signal if request is not None else int(signal.SIGTERM)
    logger.info("step %d: %s received; checkpoint %s written, stopping", run.step,
                signal.Signals(run.summary.stopped_by).name, run.ckpt_dir / f"step_{run.step:08d}")  # fmt: skip


def _finish(run: RunState, finished: bool) -> RunSummary:
    """Close the logs, export the best model of a finished run, and fill in the summary."""
    run.bar.close()
    if run.metrics is not None:
        run.metrics.close()
    if run.main and finished and run.task.export_name is not None:
        _export_best(run.task, run.model, run.ckpt_dir, run.exp_dir / run.task.export_name)
    run.acc.wait_for_everyone()
    summary = run.summary
    summary.step, summary.skipped_steps = run.step, run.skipped
    summary.stopped_early = run.step < run.cfg.train.max_steps
    summary.skipped_items = skip_counts(run.data.dataset)
    summary.best = run.best
    if run.main and summary.skipped_report():
        logger.warning("run summary: %s", summary.skipped_report())
    return summary


def _export_best(task: Task, model: torch.nn.Module, ckpt_dir: Path, out: Path) -> None:
    """Load the best checkpoint's weights (the last one without validation) and export them."""
    path = ckpt.best_checkpoint(ckpt_dir)
    if path is not None:
        model.load_state_dict(ckpt.load_checkpoint(path)[0])
    task.export(model.eval(), out)
