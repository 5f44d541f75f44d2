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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from speechvq import signals
from speechvq.configio import parse_yaml
from speechvq.data import BucketBatchSampler
from speechvq.errors import UserInputError
from speechvq.files import read_text, write_atomic
from speechvq.train import checkpoint as ckpt
from speechvq.train import launch
from speechvq.train.lock import experiment_lock
from speechvq.train.metrics import MetricsLogger, read_metrics
from speechvq.train.optim import build_optimizer, lr_at, set_lr_
from speechvq.train.tasks.base import Task

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


@dataclass
class RunSummary:
    """What :func:`train` returns."""

    step: int
    """Updates done."""
    last_train: dict[str, float] = field(default_factory=dict)
    """The last training metric record."""
    last_valid: dict[str, float] | None = None
    """The last validation record, if any."""
    warnings: list[str] = field(default_factory=list)
    """Codes of every warning the task raised (see :mod:`speechvq.train.diagnostics`)."""
    skipped_steps: int = 0
    """Updates skipped for a non-finite loss or gradient."""
    stopped_early: bool = False
    """True when the run stopped before ``max_steps`` (time budget or ``stop_at_step``)."""
    main_process: bool = True
    """Whether this process is the main one (the one that logs and writes)."""
    skipped_items: dict[str, int] = field(default_factory=dict)
    """Training items skipped because they could not be used, by reason (``missing``, ``corrupt``...)."""
    skipped_valid_items: dict[str, int] = field(default_factory=dict)
    """Validation items skipped, by reason; the validation scores cover the others."""
    save_failures: list[str] = field(default_factory=list)
    """Checkpoints that could not be written (``train.on_save_error: continue``), one message each."""
    unsaved_best: dict[str, float] | None = None
    """``{"step", "valid_loss"}`` of a validation score better than the exported best model's, whose
    checkpoint could not be written (so ``best_model`` is stale), or None."""
    best: dict[str, Any] | None = None
    """``{"step", "valid_loss"}`` of the best checkpoint at the end (None without validation)."""
    stopped_by: int | None = None
    """The signal (SIGTERM, SIGINT) that stopped the run after a checkpoint, if one did."""

    def skipped_report(self) -> str:
        """``"3 training items skipped (missing: 2, corrupt: 1)"``, or "" when none was skipped."""
        parts = []
        for what, counts in (("training", self.skipped_items), ("validation", self.skipped_valid_items)):
            if counts:
                detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                parts.append(f"{sum(counts.values())} {what} item(s) skipped ({detail})")
        return "; ".join(parts)


class NoUsableDataError(UserInputError):
    """A whole pass over a data split found no item that could be used."""


def _skip_counts(dataset: Any) -> dict[str, int]:
    counts = getattr(dataset, "bad_items", None)
    return dict(counts()) if callable(counts) else {}


def _describe_skips(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none recorded"


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Batches:
    """Endless batches over epochs; counts the batches consumed in the current epoch.

    Batches whose every item failed to load (the dataset logs and counts each) are passed over. At
    the end of every epoch the dataset's skipped-item counts are logged; a whole epoch without one
    usable item raises :class:`NoUsableDataError` instead of looping forever.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: BucketBatchSampler,
        collate: Callable[[list[Any]], Any],
        num_workers: int,
        name: str = "data",
        main: bool = True,
    ) -> None:
        self.dataset, self.sampler, self.name, self.main = dataset, sampler, name, main
        self.loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            worker_init_fn=signals.ignore_in_worker if num_workers > 0 else None,
        )  # fmt: skip
        self.epoch, self.consumed, self._it = sampler.epoch, 0, None
        self._usable = 0  # usable batches in the current epoch
        self._whole_epoch = True  # the current epoch started at its first batch (not a resume)

    def resume_(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.epoch, self.consumed = int(state["epoch"]), int(state["num_consumed"])
        self._whole_epoch = self.consumed == 0

    def next(self) -> Any:
        """The next batch with at least one item."""
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:
                self.consumed += 1
                if len(batch) == 0:  # every item of the batch failed to load (logged by the dataset)
                    continue
                self._usable += 1
                return batch
            self._end_epoch()

    def _end_epoch(self) -> None:
        counts = _skip_counts(self.dataset)
        if self.main and counts:
            logger.warning(
                "%s: epoch %d done: %d of %d items skipped so far (%s)",
                self.name, self.epoch, sum(counts.values()), len(self.dataset), _describe_skips(counts),
            )  # fmt: skip
        if self._usable == 0 and self._whole_epoch:
            raise NoUsableDataError(
                f"{self.name}: no item could be used in a whole pass over the data "
                f"({len(self.dataset)} items; skipped: {_describe_skips(counts)}); see the warnings above"
            )
        self._it, self.epoch, self.consumed = None, self.epoch + 1, 0
        self._usable, self._whole_epoch = 0, True

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict(num_consumed=self.consumed)
        state["epoch"] = self.epoch
        return state


def _sums(names: tuple[str, ...], stats: dict[str, float]) -> torch.Tensor:
    return torch.tensor([float(stats.get(n, 0.0)) for n in names], dtype=torch.float64)


@torch.no_grad()
def evaluate(
    task: Task, model: torch.nn.Module, data: _Batches, acc: Accelerator, seed: int
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
            f"skipped: {_describe_skips(_skip_counts(data.dataset))}); fix the validation data or drop it"
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
    t = cfg.train
    if t.precision == "fp16" and (t.cpu or not torch.cuda.is_available()):
        raise UserInputError("`train.precision` must be fp32 or bf16 on the CPU, but is fp16 instead.")
    acc = Accelerator(
        mixed_precision={"fp32": "no"}.get(t.precision, t.precision),
        # without a GPU accelerate only forms a multi-process (gloo) group when told it runs on the CPU
        cpu=t.cpu or not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)],
    )
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    launch_warning = launch.process_count_warning(world)
    if launch_warning is not None and main:
        logger.warning("%s", launch_warning)
    ckpt_dir = exp_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(ckpt_dir)
    if require_resume and resume_from is None:
        raise UserInputError(f"{ckpt_dir}: --resume given, but there is no checkpoint to resume from")
    config_yaml = task.config_yaml()
    if resume_from is not None:
        saved = parse_yaml(read_text(resume_from / "config.yaml", "checkpoint config"), str(resume_from))
        if not isinstance(saved, dict):
            raise ckpt.CorruptCheckpointError(f"{resume_from}/config.yaml: must hold a mapping of sections")
        task.check_resume(saved, resume_from)
    if main:
        write_atomic(exp_dir / "config.yaml", config_yaml)

    # model, optimizer, data
    torch.manual_seed(t.seed)
    model = task.build_model()
    state: dict[str, Any] = {}
    if resume_from is not None:
        weights, state = ckpt.load_checkpoint(resume_from)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:  # names or shapes of another model
            first = str(err).strip().splitlines()
            raise ckpt.CorruptCheckpointError(
                f"{resume_from / 'model.safetensors'}: the weights do not fit the model ({' '.join(first[:3])[:300]})"
            ) from None
        logger.info("resuming from %s (step %d)", resume_from, state["step"])
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    def open_data(path: str, train: bool) -> _Batches:
        parts = task.open_data(path, train=train, num_replicas=world, rank=rank)
        return _Batches(*parts, num_workers=cfg.data.num_workers, name=path, main=main)

    data = open_data(cfg.data.train, True)
    valid = open_data(cfg.data.valid, False) if cfg.data.valid else None
    step, attempt, skipped, in_a_row = 0, 0, 0, 0
    # the best checkpoint as of the one resumed from (its meta.json holds it); best.json follows it
    best = ckpt.best_of(resume_from, ckpt_dir)
    if main and resume_from is not None and ckpt.read_best(ckpt_dir) != best:
        ckpt.write_best(ckpt_dir, *((best["step"], best["valid_loss"]) if best else (None,)))
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
    if main:
        logger.info(
            "%s: %d process%s on %s, precision %s, batch %s per process x %d accumulated; %s; "
            "train %s%s; %s",
            task.name, world, "" if world == 1 else "es", launch.describe_device(acc.device), t.precision,
            _batch_text(cfg.data), t.grad_accum, launch.describe_parameters(model),
            launch.describe_data(data.dataset), f", valid {launch.describe_data(valid.dataset)}" if valid else "",
            f"resuming at update {step} of {t.max_steps}" if state else f"{t.max_steps} updates from scratch",
        )  # fmt: skip
    already_done = bool(state) and step >= t.max_steps

    def better(score: float) -> bool:
        if best is None:
            return True
        return score < best["valid_loss"] if task.lower_is_better else score > best["valid_loss"]

    def save(valid_score: float | None = None) -> None:
        nonlocal best
        rngs = gather_object([ckpt.rng_state()]) if world > 1 else [ckpt.rng_state()]
        improved = valid_score is not None and better(valid_score)
        new_best = {"step": step, "valid_loss": valid_score} if improved else best
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
            try:
                ckpt.save_checkpoint(
                    ckpt_dir, step, weights=_untied(model.state_dict()), state=train_state, config_yaml=config_yaml,
                    valid_loss=valid_score, best=new_best,
                )  # fmt: skip
            except ckpt.CheckpointWriteError as err:
                if t.on_save_error == "stop":
                    raise
                logger.error("%s; continuing (train.on_save_error=continue)", err)
                summary.save_failures.append(str(err))
                if improved:  # best_model will not have this score's weights
                    summary.unsaved_best = {"step": step, "valid_loss": float(valid_score)}  # type: ignore[arg-type]
                acc.wait_for_everyone()
                return
            if improved:  # the score is stored as valid_loss; meta.json already holds the record
                ckpt.write_best(ckpt_dir, step, valid_score)
            ckpt.rotate_checkpoints(ckpt_dir, t.keep_last)
        best = new_best
        acc.wait_for_everyone()

    names = task.stat_names
    metrics = MetricsLogger(exp_dir, tensorboard=t.tensorboard) if main else None
    summary = RunSummary(step=step, skipped_steps=skipped, main_process=main)
    if already_done:
        # a re-run of a finished run: nothing to train; say so, and report its last records
        records = read_metrics(exp_dir) if (exp_dir / "metrics.jsonl").is_file() else []
        summary.last_train = next((r for r in reversed(records) if r["split"] == "train"), {})
        summary.last_valid = next((r for r in reversed(records) if r["split"] == "valid"), None)
        if main:
            logger.info(
                "%s: this run is already finished (%d of %d updates, %s); nothing to train. Last "
                "training record: %s%s",
                task.name, step, t.max_steps, resume_from, _metric_line(summary.last_train) or "none",
                f"; last validation: {_metric_line(summary.last_valid)}" if summary.last_valid else "",
            )  # fmt: skip
    stop = False  # set when the time budget ends the run
    interval = torch.zeros(len(names), dtype=torch.float64)
    grad_norms: list[float] = []
    bar = tqdm(total=t.max_steps, initial=step, disable=not (main and t.progress_bar), desc=task.name)
    start_time = tick = time.monotonic()
    last_stop = min(t.max_steps, stop_at_step if stop_at_step is not None else t.max_steps)

    while step < last_stop:
        lr = lr_at(step, cfg.optim.lr, t.max_steps, cfg.schedule)
        set_lr_(optimizer, lr)
        task.on_update(model, step)
        sums = torch.zeros(len(names), dtype=torch.float64)
        for micro in range(t.grad_accum):
            batch = data.next().to(acc.device)
            slot_seed = _seed_for(t.seed, attempt, micro * world + rank)
            torch.manual_seed(slot_seed)
            last = micro == t.grad_accum - 1
            with contextlib.nullcontext() if last else acc.no_sync(ddp_model):
                loss, stats = task.batch_loss(
                    ddp_model, model, batch, generator=_generator(slot_seed),
                    update_generator=_generator(_seed_for(t.seed, attempt, 7)),
                )  # fmt: skip
                acc.backward(loss)
            sums += _sums(names, stats)

        # normalise by the targets of all batches on all ranks, clip, step (or skip)
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        if acc.scaler is not None:
            acc.unscale_gradients()
        scale = world / max(float(sums[names.index("targets")]), 1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = sums[names.index("nonfinite")] == 0 and math.isfinite(grad_norm)
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
            interval_sums = dict(zip(names, interval.tolist()))
            rec = task.record(interval_sums)
            rec.update(grad_norm=float(np.mean(grad_norms)), lr=lr, skipped_steps=skipped, step=step)
            for code, message in task.on_log(step, rec, interval_sums, time.monotonic() - tick, main):
                if main:
                    logger.warning("step %d: possible collapse [%s]: %s", step, code, message)
                if code not in summary.warnings:
                    summary.warnings.append(code)
            summary.last_train = rec
            if metrics is not None:
                metrics.log("train", step, rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                logger.info("step %d/%d: %s", step, t.max_steps, _metric_line(rec))
            interval.zero_()
            grad_norms.clear()
            tick = time.monotonic()

        out_of_time = t.max_wall_s is not None and time.monotonic() - start_time > t.max_wall_s
        # a signal on any rank: finish this update, save, stop (all ranks at the same update)
        received = request is not None and request.requested
        flags = acc.reduce(torch.tensor([float(out_of_time), float(received)], device=acc.device), "sum")
        stop, signalled = bool(flags.sum() > 0), bool(flags[1] > 0)
        score = None
        if valid is not None and (step % t.valid_interval == 0 or step == t.max_steps):
            vrec, score = evaluate(task, model, valid, acc, t.seed)
            skipped_valid = _skip_counts(valid.dataset)
            if main and skipped_valid and not summary.skipped_valid_items:
                logger.warning(
                    "%s: %d of %d validation items skipped (%s); the scores cover the others",
                    valid.name, sum(skipped_valid.values()), len(valid.dataset), _describe_skips(skipped_valid),
                )  # fmt: skip
            summary.skipped_valid_items = skipped_valid
            summary.last_valid = vrec
            if metrics is not None:
                metrics.log("valid", step, vrec)
            logger.info("step %d: validation %s", step, ", ".join(f"{k} {v:.4g}" for k, v in vrec.items()))
        if score is not None or step % t.save_interval == 0 or step == last_stop or stop:
            save(score)
        if signalled:
            summary.stopped_by = request.signal if received and request is not None else int(signal.SIGTERM)
            logger.info("step %d: %s received; checkpoint %s written, stopping", step,
                        signal.Signals(summary.stopped_by).name, ckpt_dir / f"step_{step:08d}")  # fmt: skip
            break
        if stop:
            logger.info("step %d: time budget of %.0f s spent, stopping", step, t.max_wall_s)
            break

    bar.close()
    if metrics is not None:
        metrics.close()
    # the run is over (all updates done, or its time budget spent; not a simulated interruption)
    finished = step >= t.max_steps or (stop_at_step is None and stop and summary.stopped_by is None)
    if main and finished and task.export_name is not None:
        _export_best(task, model, ckpt_dir, exp_dir / task.export_name)
    acc.wait_for_everyone()
    summary.step, summary.skipped_steps = step, skipped
    summary.stopped_early = step < t.max_steps
    summary.skipped_items = _skip_counts(data.dataset)
    summary.best = best
    if main and summary.skipped_report():
        logger.warning("run summary: %s", summary.skipped_report())
    return summary


_LOGGED = ("loss", "accuracy", "wer", "cer", "code_perplexity", "prob_perplexity", "temperature",
           "grad_norm", "lr", "audio_s_per_s", "tokens_per_s")  # fmt: skip
"""The metrics of a periodic log line (every metric is in metrics.jsonl), in this order."""


def _metric_line(rec: dict[str, Any] | None) -> str:
    """``loss 3.21, accuracy 0.45, ..., lr 0.0005`` of the :data:`_LOGGED` metrics in ``rec``."""
    if not rec:
        return ""
    return ", ".join(
        f"{k.replace('_', ' ')} {rec[k]:.4g}" for k in _LOGGED if isinstance(rec.get(k), (int, float))
    )


def _batch_text(data: Any) -> str:
    """``64,000 samples (4.0 s)`` for audio data, ``16,384 tokens`` for units."""
    tokens = int(data.max_tokens)
    rate = getattr(data, "sample_rate", None)
    return f"{tokens:,} samples ({tokens / rate:.1f} s)" if rate else f"{tokens:,} tokens"


def _untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with a copy of every tensor that shares storage with an earlier one (tied
    embeddings), which safetensors refuses to write; loading sets the tied parameter twice."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def _export_best(task: Task, model: torch.nn.Module, ckpt_dir: Path, out: Path) -> None:
    """Load the best checkpoint's weights (the last one without validation) and export them."""
    path = ckpt.best_checkpoint(ckpt_dir)
    if path is not None:
        model.load_state_dict(ckpt.load_checkpoint(path)[0])
    task.export(model.eval(), out)
