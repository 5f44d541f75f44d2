"""The state of one training run, and the steps around the updates: setup and resume, checkpoints.

:func:`speechvq.train.loop.train` runs the updates; this module builds what they run on
(:func:`setup_run`: accelerate, the model with resumed weights, optimizer, data, the resumed
position and RNG states) and writes what a resume needs (:func:`save_checkpoint`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from tqdm.auto import tqdm

from speechvq.configio import parse_yaml
from speechvq.errors import UserInputError
from speechvq.files import read_text, write_atomic
from speechvq.train import checkpoint as ckpt
from speechvq.train import launch
from speechvq.train.batches import Batches
from speechvq.train.metrics import MetricsLogger, read_metrics
from speechvq.train.optim import build_optimizer
from speechvq.train.tasks.base import Task

logger = logging.getLogger("speechvq.train.loop")  # the loop's log lines, as they always were


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


@dataclass
class RunState:
    """The state of one training run between updates (see :func:`_setup`)."""

    task: Task
    cfg: Any
    exp_dir: Path
    acc: Accelerator
    model: torch.nn.Module
    """The unwrapped model (losses, attributes, checkpoints)."""
    ddp_model: Any
    """The model as wrapped for training (forward passes)."""
    optimizer: Any
    params: list[torch.nn.Parameter]
    """The trainable parameters, as of the start (their gradients are normalised and clipped)."""
    data: Batches
    valid: Batches | None
    config_yaml: str
    resume_from: Path | None
    step: int = 0
    """Updates done."""
    attempt: int = 0
    """Updates tried, skipped ones included (seeds each update's randomness)."""
    skipped: int = 0
    in_a_row: int = 0
    """Updates skipped in a row for a non-finite loss or gradient."""
    best: dict[str, Any] | None = None
    """``{"step", "valid_loss"}`` of the best checkpoint so far."""
    summary: RunSummary = field(default_factory=lambda: RunSummary(step=0))
    metrics: MetricsLogger | None = None
    """Writes metrics.jsonl (main process only)."""
    interval: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    """Statistics summed since the last log line."""
    grad_norms: list[float] = field(default_factory=list)
    """Gradient norms since the last log line."""
    bar: Any = None
    start_time: float = 0.0
    tick: float = 0.0
    """When the current log interval started."""

    @property
    def ckpt_dir(self) -> Path:
        return self.exp_dir / "checkpoints"

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def world(self) -> int:
        return self.acc.num_processes


def accelerator_for(task: Task, t: Any) -> Accelerator:
    """accelerate for the run's precision and device, with the launch warning logged."""
    if t.precision == "fp16" and (t.cpu or not torch.cuda.is_available()):
        raise UserInputError("`train.precision` must be fp32 or bf16 on the CPU, but is fp16 instead.")
    acc = Accelerator(
        mixed_precision={"fp32": "no"}.get(t.precision, t.precision),
        # without a GPU accelerate only forms a multi-process (gloo) group when told it runs on the CPU
        cpu=t.cpu or not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)],
    )
    launch_warning = launch.process_count_warning(acc.num_processes)
    if launch_warning is not None and acc.is_main_process:
        logger.warning("%s", launch_warning)
    return acc


def setup_run(task: Task, cfg: Any, exp_dir: Path, acc: Accelerator, require_resume: bool) -> RunState:
    """Config check and copy, model (resumed weights), optimizer, data and the resumed position."""
    t = cfg.train
    resume_from, config_yaml = _resume_point(task, exp_dir, require_resume, acc.is_main_process)
    torch.manual_seed(t.seed)
    model, state = _load_model(task, resume_from)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    data = _open_split(task, cfg, acc, cfg.data.train, train=True)
    valid = _open_split(task, cfg, acc, cfg.data.valid, train=False) if cfg.data.valid else None
    run = RunState(
        task, cfg, exp_dir, acc, model, ddp_model, optimizer, params, data, valid, config_yaml, resume_from
    )
    _restore(run, state)
    if run.main:
        _log_start(run, resumed=bool(state))
    run.metrics = MetricsLogger(exp_dir, tensorboard=t.tensorboard) if run.main else None
    run.summary = RunSummary(step=run.step, skipped_steps=run.skipped, main_process=run.main)
    if state and run.step >= t.max_steps:
        _report_finished(run)
    run.interval = torch.zeros(len(task.stat_names), dtype=torch.float64)
    run.bar = tqdm(
        total=t.max_steps, initial=run.step, disable=not (run.main and t.progress_bar), desc=task.name
    )
    run.start_time = run.tick = time.monotonic()
    return run


def _resume_point(task: Task, exp_dir: Path, require_resume: bool, main: bool) -> tuple[Path | None, str]:
    """(checkpoint to resume from or None, the run's config YAML), once the task has accepted the
    checkpoint's config; the config is written to ``exp_dir/config.yaml``."""
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
    return resume_from, config_yaml


def _load_model(task: Task, resume_from: Path | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task's model, with the checkpoint's weights when resuming, and the checkpoint's
    training state ({} for a new run)."""
    model = task.build_model()
    if resume_from is None:
        return model, {}
    weights, state = ckpt.load_checkpoint(resume_from)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # names or shapes of another model
        first = str(err).strip().splitlines()
        raise ckpt.CorruptCheckpointError(
            f"{resume_from / 'model.safetensors'}: the weights do not fit the model ({' '.join(first[:3])[:300]})"
        ) from None
    logger.info("resuming from %s (step %d)", resume_from, state["step"])
    return model, state


def _open_split(task: Task, cfg: Any, acc: Accelerator, path: str, *, train: bool) -> Batches:
    parts = task.open_data(path, train=train, num_replicas=acc.num_processes, rank=acc.process_index)
    return Batches(*parts, num_workers=cfg.data.num_workers, name=path, main=acc.is_main_process)


def _restore(run: RunState, state: dict[str, Any]) -> None:
    """The best checkpoint as of the one resumed from, and (resuming) the optimizer, loss scaler,
    data position, counters and RNG states."""
    # the best checkpoint as of the one resumed from (its meta.json holds it); best.json follows it
    run.best = ckpt.best_of(run.resume_from, run.ckpt_dir)
    if run.main and run.resume_from is not None and ckpt.read_best(run.ckpt_dir) != run.best:
        ckpt.write_best(run.ckpt_dir, *((run.best["step"], run.best["valid_loss"]) if run.best else (None,)))
    if not state:
        return
    run.optimizer.load_state_dict(state["optimizer"])
    if run.acc.scaler is not None and state.get("scaler"):
        run.acc.scaler.load_state_dict(state["scaler"])
    try:
        run.data.resume_(state["sampler"])
    except ValueError as err:
        raise UserInputError(
            f"{run.resume_from}: the saved data position does not fit the current data (were data.* "
            f"settings or the manifest changed?): {err}"
        ) from err
    run.step, run.attempt, run.skipped = state["step"], state["attempt"], state["skipped"]
    ckpt.set_rng_state_(state["rng"][run.acc.process_index % len(state["rng"])])


def _log_start(run: RunState, *, resumed: bool) -> None:
    t, world = run.cfg.train, run.world
    logger.info(
        "%s: %d process%s on %s, precision %s, batch %s per process x %d accumulated; %s; "
        "train %s%s; %s",
        run.task.name, world, "" if world == 1 else "es", launch.describe_device(run.acc.device), t.precision,
        _batch_text(run.cfg.data), t.grad_accum, launch.describe_parameters(run.model),
        launch.describe_data(run.data.dataset),
        f", valid {launch.describe_data(run.valid.dataset)}" if run.valid else "",
        f"resuming at update {run.step} of {t.max_steps}" if resumed else f"{t.max_steps} updates from scratch",
    )  # fmt: skip


def _report_finished(run: RunState) -> None:
    """A re-run of a finished run: nothing to train; say so, and report its last records."""
    summary = run.summary
    records = read_metrics(run.exp_dir) if (run.exp_dir / "metrics.jsonl").is_file() else []
    summary.last_train = next((r for r in reversed(records) if r["split"] == "train"), {})
    summary.last_valid = next((r for r in reversed(records) if r["split"] == "valid"), None)
    if run.main:
        logger.info(
            "%s: this run is already finished (%d of %d updates, %s); nothing to train. Last "
            "training record: %s%s",
            run.task.name, run.step, run.cfg.train.max_steps, run.resume_from,
            metric_line(summary.last_train) or "none",
            f"; last validation: {metric_line(summary.last_valid)}" if summary.last_valid else "",
        )  # fmt: skip


def _better(run: RunState, score: float) -> bool:
    if run.best is None:
        return True
    return score < run.best["valid_loss"] if run.task.lower_is_better else score > run.best["valid_loss"]


def save_checkpoint(run: RunState, valid_score: float | None = None) -> None:
    """Write a checkpoint of this update (and make it the best one if ``valid_score`` beats it)."""
    acc, step = run.acc, run.step
    rngs = gather_object([ckpt.rng_state()]) if run.world > 1 else [ckpt.rng_state()]
    improved = valid_score is not None and _better(run, valid_score)
    new_best = {"step": step, "valid_loss": valid_score} if improved else run.best
    if run.main:
        try:
            ckpt.save_checkpoint(
                run.ckpt_dir, step, weights=_untied(run.model.state_dict()), state=_train_state(run, rngs),
                config_yaml=run.config_yaml, valid_loss=valid_score, best=new_best,
            )  # fmt: skip
        except ckpt.CheckpointWriteError as err:
            if run.cfg.train.on_save_error == "stop":
                raise
            logger.error("%s; continuing (train.on_save_error=continue)", err)
            run.summary.save_failures.append(str(err))
            if improved:  # best_model will not have this score's weights
                run.summary.unsaved_best = {"step": step, "valid_loss": float(valid_score)}  # type: ignore[arg-type]
            acc.wait_for_everyone()
            return
        if improved:  # the score is stored as valid_loss; meta.json already holds the record
            ckpt.write_best(run.ckpt_dir, step, valid_score)
        ckpt.rotate_checkpoints(run.ckpt_dir, run.cfg.train.keep_last)
    run.best = new_best
    acc.wait_for_everyone()


def _train_state(run: RunState, rngs: list[Any]) -> dict[str, Any]:
    """The training state a checkpoint holds besides the weights (everything an exact resume needs)."""
    return {
        "step": run.step,
        "attempt": run.attempt,
        "skipped": run.skipped,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"name": run.cfg.schedule.name, "step": run.step},
        "scaler": run.acc.scaler.state_dict() if run.acc.scaler is not None else None,
        "sampler": run.data.state_dict(),
        "rng": rngs,
    }


LOGGED_METRICS = ("loss", "accuracy", "wer", "cer", "code_perplexity", "prob_perplexity", "temperature",
           "grad_norm", "lr", "audio_s_per_s", "tokens_per_s")  # fmt: skip
"""The metrics of a periodic log line (every metric is in metrics.jsonl), in this order."""


def metric_line(rec: dict[str, Any] | None) -> str:
    """``loss 3.21, accuracy 0.45, ..., lr 0.0005`` of the :data:`LOGGED_METRICS` metrics in ``rec``."""
    if not rec:
        return ""
    return ", ".join(
        f"{k.replace('_', ' ')} {rec[k]:.4g}" for k in LOGGED_METRICS if isinstance(rec.get(k), (int, float))
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
