"""What the training loop asks of a task.

:func:`speechvq.train.loop.train` is one linear loop over updates; everything that differs between
wav2vec 2.0 / vq-wav2vec pretraining, CTC fine-tuning and unit-BERT pretraining sits behind
:class:`Task`: the model, the data, the loss of one batch with its summed statistics, the metric
record, the validation score and the export. Statistics are plain per-batch *sums* (floats) named
in ``stat_names``; the loop adds them over accumulated batches and ranks and hands the sums back.
Two names are required: ``targets`` (the loss normaliser N of the update) and ``nonfinite``
(1 for a batch whose loss is not finite).

The tasks themselves are the sibling modules, one per task; each one's command builds it and
hands it to the loop, which imports no model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from speechvq.data import BucketBatchSampler

DataParts = tuple[torch.utils.data.Dataset, BucketBatchSampler, Callable[[list[Any]], Any]]
"""(dataset, batch sampler, collate function) of one split."""


class Task(Protocol):
    """The task-specific half of a training run (see the module docstring)."""

    name: str
    """Short name (progress bar, log lines)."""
    stat_names: tuple[str, ...]
    """Per-batch sums of training; must contain ``targets`` and ``nonfinite``."""
    eval_stat_names: tuple[str, ...]
    """Per-batch sums of validation."""
    lower_is_better: bool
    """Whether a lower validation score is better (chooses the best checkpoint)."""
    export_name: str | None
    """Subdirectory of the experiment directory that :meth:`export` writes when the run has done
    ``train.max_steps`` updates (the best checkpoint's weights, else the last); None: no export."""
    find_unused_parameters: bool
    """Whether some trainable parameters may get no gradient in an update (DDP needs to know)."""

    def config_yaml(self) -> str:
        """The resolved run config, written to ``exp_dir/config.yaml`` and every checkpoint."""

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        """Raise :class:`UserInputError` if the checkpoint config ``saved`` cannot be resumed."""

    def build_model(self) -> nn.Module:
        """The model to train (random or pretrained init; a resume loads weights over it)."""

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> DataParts:
        """Dataset, sampler and collate function of one split."""

    def on_update(self, model: nn.Module, step: int) -> None:
        """Called before every update with the number of updates done (schedules inside the model)."""

    def batch_loss(
        self,
        module: Callable[..., Any],
        model: nn.Module,
        batch: Any,
        *,
        generator: torch.Generator,
        update_generator: torch.Generator,
    ) -> tuple[Tensor, dict[str, float]]:
        """(summed loss to back-propagate, statistics sums) of one training batch.

        Args:
            module: the model as wrapped for training (DDP); call it for the forward pass.
            model: the unwrapped model (losses, attributes).
            batch: the collated batch, on the device.
            generator: RNG of this batch slot (masks, sampling).
            update_generator: RNG shared by every batch and rank of the update (LayerDrop).
        """

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """The training metric record of summed statistics."""

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        """Add task metrics to ``rec`` at a log step; returns warnings as (code, message)."""

    def eval_batch(self, model: nn.Module, batch: Any) -> dict[str, float]:
        """Statistics sums of one validation batch (eval mode, no grad)."""

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        """(validation record, score) of summed validation statistics."""

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write the final model for use outside training (e.g. the best checkpoint's weights)."""
