"""The sections every training run shares (optimizer, schedule, loop) and the base of run configs.

Pretraining (:mod:`speechvq.train.config`), CTC fine-tuning (:mod:`speechvq.train.finetune`) and the
unit-BERT runs compose their configs from these sections; each field is documented once, by the
attribute docstring under it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from speechvq.config import to_plain
from speechvq.errors import UserInputError
from speechvq.ranges import check_range

MAX_SAMPLE_RATE = 1_000_000
"""Largest ``data.sample_rate`` accepted (1 MHz; speech is 8-48 kHz)."""


def check_sampling(data: Any, prefix: str) -> None:
    """``sample_rate``, ``max_tokens`` and ``num_workers`` of a data section (those it has)."""
    if hasattr(data, "sample_rate"):
        check_range(f"{prefix}.sample_rate", data.sample_rate, 1, MAX_SAMPLE_RATE, integer=True)
    check_range(f"{prefix}.max_tokens", data.max_tokens, 1, integer=True)
    check_range(f"{prefix}.num_workers", data.num_workers, 0, integer=True)


@dataclass(kw_only=True)
class OptimSection:
    """Adam with decoupled weight decay (fairseq ``adam``, which decays weights as AdamW does)."""

    lr: float = 5e-4
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.98)
    """Adam (beta1, beta2)."""

    eps: float = 1e-6
    """Adam epsilon."""

    weight_decay: float = 0.01
    """Decoupled weight decay."""

    clip_grad_norm: float = 10.0
    """Clip the total gradient norm to this value; 0 disables clipping (fairseq ``clip_norm``)."""

    def validate(self, prefix: str = "optim") -> None:
        """lr > 0, betas in [0, 1), eps, weight decay and clipping >= 0, all finite."""
        check_range(f"{prefix}.lr", self.lr, 0, low_open=True)
        for i, beta in enumerate(self.betas):
            check_range(f"{prefix}.betas[{i}]", beta, 0, 1, high_open=True)
        check_range(f"{prefix}.eps", self.eps, 0)
        check_range(f"{prefix}.weight_decay", self.weight_decay, 0)
        check_range(f"{prefix}.clip_grad_norm", self.clip_grad_norm, 0)


@dataclass(kw_only=True)
class ScheduleSection:
    """Learning-rate schedule; see :func:`speechvq.train.optim.lr_at`."""

    name: Literal["polynomial", "tri_stage", "cosine", "constant"] = "polynomial"
    """``polynomial``: linear warmup, then polynomial decay to ``end_lr_scale`` (fairseq
    ``polynomial_decay``). ``tri_stage``: warmup / hold / exponential decay by ``phase_ratio``.
    ``cosine``: linear warmup, then cosine decay to ``end_lr_scale``. ``constant``: warmup, then flat."""

    warmup_steps: int = 32000
    """Linear warmup updates (polynomial, cosine, constant)."""

    power: float = 1.0
    """Exponent of the polynomial decay (1 = linear)."""

    end_lr_scale: float = 0.0
    """Final lr as a fraction of the peak (polynomial, cosine)."""

    phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5)
    """Tri-stage warmup / hold / decay fractions of ``train.max_steps``."""

    init_lr_scale: float = 0.01
    """Tri-stage lr at step 0 as a fraction of the peak."""

    final_lr_scale: float = 0.05
    """Tri-stage lr at the end as a fraction of the peak."""

    def validate(self, prefix: str = "schedule") -> None:
        """A known name, warmup >= 0, fractions and scales in range, phases summing to 1."""
        if self.name not in ("polynomial", "tri_stage", "cosine", "constant"):
            raise UserInputError(
                f"`{prefix}.name` must be polynomial, tri_stage, cosine or constant, "
                f"but is {self.name!r} instead."
            )
        check_range(f"{prefix}.warmup_steps", self.warmup_steps, 0, integer=True)
        check_range(f"{prefix}.power", self.power, 0, low_open=True)
        check_range(f"{prefix}.end_lr_scale", self.end_lr_scale, 0, 1)
        for i, ratio in enumerate(self.phase_ratio):
            check_range(f"{prefix}.phase_ratio[{i}]", ratio, 0, 1)
        if abs(sum(self.phase_ratio) - 1.0) > 1e-6:
            raise UserInputError(
                f"`{prefix}.phase_ratio` must sum to 1, but is {list(self.phase_ratio)} instead."
            )
        check_range(f"{prefix}.init_lr_scale", self.init_lr_scale, 0, 1)
        # tri-stage decays exponentially to it: log(final_lr_scale) must exist
        check_range(f"{prefix}.final_lr_scale", self.final_lr_scale, 0, 1, low_open=True)

    def warmup_updates(self, max_steps: int) -> int:
        """Updates spent warming up under this schedule."""
        if self.name == "tri_stage":
            return int(self.phase_ratio[0] * max_steps)
        return self.warmup_steps


@dataclass(kw_only=True)
class TrainSection:
    """Steps, batching across steps and processes, precision, intervals."""

    max_steps: int = 400000
    """Optimizer updates to run."""

    grad_accum: int = 1
    """Batches accumulated per update (fairseq ``update_freq``)."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``bf16``: bf16 autocast (CPU and GPU). ``fp16``: fp16 autocast with loss scaling (GPU only).
    Logits, quantizer and losses always run in fp32."""

    seed: int = 1
    """Seeds the model init, the data order and every per-step random draw."""

    cpu: bool = False
    """Run on the CPU even if a GPU is visible."""

    log_interval: int = 100
    """Updates between metric records (and collapse checks)."""

    valid_interval: int = 10000
    """Updates between validations (and best-checkpoint decisions)."""

    save_interval: int = 10000
    """Updates between checkpoints; a checkpoint is also written at the end of the run."""

    keep_last: int = 2
    """Checkpoints to keep besides the best one."""

    on_save_error: Literal["stop", "continue"] = "stop"
    """When a checkpoint cannot be written (e.g. the disk is full): ``stop`` ends the run with a
    one-line error; ``continue`` logs the error and trains on (earlier checkpoints stay intact)."""

    max_nonfinite: int = 20
    """Stop the run after this many skipped (non-finite) updates in a row."""

    max_wall_s: float | None = None
    """Stop (with a checkpoint) after this many seconds of training; None for no limit."""

    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""

    tensorboard: bool = True
    """Write TensorBoard event files to ``exp_dir/tensorboard`` (needs ``tensorboard``)."""

    def validate(self) -> None:
        """Counts and intervals at least 1, a seed torch accepts, a known precision and save-error
        policy; raises :class:`UserInputError`."""
        for name in (
            "max_steps",
            "grad_accum",
            "log_interval",
            "valid_interval",
            "save_interval",
            "keep_last",
            "max_nonfinite",
        ):
            check_range(f"train.{name}", getattr(self, name), 1, integer=True)
        check_range("train.seed", self.seed, 0, MAX_SEED, integer=True)
        check_range("train.max_wall_s", self.max_wall_s, 0, optional=True)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserInputError(
                f"`train.precision` must be fp32, bf16 or fp16, but is {self.precision!r} instead."
            )
        if self.on_save_error not in ("stop", "continue"):
            raise UserInputError(
                f"`train.on_save_error` must be stop or continue, but is {self.on_save_error!r} instead."
            )


MAX_SEED = 2**63 - 1
"""Largest ``train.seed``: torch's generators take a signed 64-bit seed."""


class RunConfig:
    """What every run config (pretraining, fine-tuning, unit BERT, unit CTC) shares beyond its
    sections: the YAML-safe dict and the checks of its ``train``, ``schedule`` and ``optim``."""

    train: TrainSection
    schedule: ScheduleSection
    optim: OptimSection

    def to_dict(self) -> dict[str, Any]:
        """A YAML-safe dict (tuples become lists)."""
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def validate_run(self) -> None:
        """The ``train``, ``schedule`` and ``optim`` checks; raises :class:`UserInputError`."""
        self.train.validate()
        self.schedule.validate()
        self.optim.validate()
