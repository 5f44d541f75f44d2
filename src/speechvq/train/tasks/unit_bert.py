"""Masked-LM pretraining of a BERT over discrete units (vq-wav2vec) as a task of the one training loop.

The model, masking and objective are :mod:`speechvq.units.bert`'s, the tokenised corpora
:class:`~speechvq.units.bert_data.UnitCorpus`; this module gives them a run config (the ``model``
section of ``conf/unit_bert_*.yaml`` plus the loop's sections) and the task. The loss is the
cross-entropy summed over masked tokens and divided by their number over the whole update (see
the loop's docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from speechvq.data import BucketBatchSampler
from speechvq.errors import UserInputError
from speechvq.train.sections import (
    OptimSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
    check_sampling,
)
from speechvq.train.tasks.base import DataParts
from speechvq.units.bert import (
    MaskedLmResult,
    UnitBertConfig,
    UnitMaskedLM,
    build_unit_bert,
    masked_lm_objective,
    save_unit_bert,
)
from speechvq.units.bert_data import UnitBatch, UnitCorpus, unigram_baseline


@dataclass(kw_only=True)
class UnitDataSection:
    """Unit corpora and batching."""

    train: str = ""
    """Training units directory (written by ``speechvq export-units``)."""
    valid: str | None = None
    """Validation units directory; None disables validation (the last weights are exported)."""
    max_tokens: int = 16384
    """Tokens per batch per process, padding included."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass(kw_only=True)
class UnitBertRunConfig(RunConfig):
    """Everything a unit-BERT run reads; ``model`` is a :class:`UnitBertConfig`."""

    model: UnitBertConfig = field(default_factory=UnitBertConfig)
    data: UnitDataSection = field(default_factory=UnitDataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> None:
        """Cross-field checks; raises :class:`UserInputError`."""
        self.validate_run()
        check_sampling(self.data, "data")
        if not self.data.train:
            raise UserInputError("`data.train` must name a units directory, but is empty instead.")
        if self.data.max_tokens < self.model.max_positions:
            raise UserInputError(
                f"`data.max_tokens` must be >= model.max_positions ({self.model.max_positions}), "
                f"but is {self.data.max_tokens} instead."
            )


class UnitBertTask:
    """Masked-LM pretraining of a unit BERT for :func:`speechvq.train.loop.train`.

    Args:
        cfg: the validated run config.
        exp_dir: the experiment directory; the dictionary (and BPE model) live there.
    """

    name = "unit-bert"
    stat_names = ("loss", "targets", "correct", "tokens", "unigram_ce", "majority_correct", "nonfinite")
    eval_stat_names = stat_names
    lower_is_better = True
    export_name = "best_model"
    find_unused_parameters = False

    def __init__(self, cfg: UnitBertRunConfig, exp_dir: Path) -> None:
        self.cfg = cfg
        self.corpus = UnitCorpus(
            cfg.model, cfg.data.train, cfg.data.valid, work_dir=exp_dir, seed=cfg.train.seed
        )
        # the baselines on the masked tokens: the training units' unigram distribution, and the
        # most frequent training unit
        self.unigram_logp, self.majority_id = unigram_baseline(
            self.corpus.train_sequences, self.corpus.dictionary
        )
        self.history: list[dict[str, float]] = []

    def config_yaml(self) -> str:
        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        if saved.get("model") != self.cfg.to_dict()["model"]:
            raise UserInputError(f"{where}/config.yaml: the model config differs from the one given")

    def build_model(self) -> nn.Module:
        return UnitMaskedLM(build_unit_bert(self.cfg.model, self.corpus.dictionary))

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> DataParts:
        ds = self.corpus.train_dataset() if train else self.corpus.valid_dataset()
        if ds is None or len(ds) == 0:
            raise UserInputError(f"{path}: no usable unit sequences")
        sampler = BucketBatchSampler(
            ds.sizes, self.cfg.data.max_tokens, num_replicas=num_replicas, rank=rank, seed=self.cfg.train.seed,
            shuffle=train, max_sample_size=self.cfg.model.max_positions, grad_accum=self.cfg.train.grad_accum,
        )  # fmt: skip
        return ds, sampler, self.corpus.collate

    def on_update(self, model: nn.Module, step: int) -> None:
        pass

    def _stats(self, out: MaskedLmResult, batch: UnitBatch) -> dict[str, float]:
        value = float(out.loss.detach())
        wanted = out.targets
        return {
            "loss": value,
            "targets": float(out.num_targets),
            # accuracy x targets rather than the count itself: the sums, and so the records, of
            # earlier runs are reproduced to the last bit
            "correct": out.correct / max(out.num_targets, 1) * out.num_targets,
            "tokens": float(int((batch.lengths - 2).sum())),
            "unigram_ce": float(-self.unigram_logp.to(wanted.device)[wanted].sum()),
            "majority_correct": float((wanted == self.majority_id).sum()),
            "nonfinite": 0.0 if math.isfinite(value) else 1.0,
        }

    def batch_loss(
        self,
        module: Callable[..., Any],
        model: nn.Module,
        batch: UnitBatch,
        *,
        generator: torch.Generator,
        update_generator: torch.Generator,
    ) -> tuple[Tensor, dict[str, float]]:
        # masks and replacements from the batch slot's generator, dropout from the seeded global RNG
        out = masked_lm_objective(module, batch, self.cfg.model, self.corpus.dictionary, generator)
        return out.loss, self._stats(out, batch)

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """Cross-entropy per masked token (nats and bits), accuracy, masked share, and the two
        baselines on the same tokens: the unigram cross-entropy of the training units and the
        accuracy of always predicting the commonest one."""
        n = max(sums["targets"], 1.0)
        loss = sums["loss"] / n
        return {
            "loss": loss,
            "loss_bits": loss / math.log(2),
            "accuracy": sums["correct"] / n,
            "unigram_ce": sums["unigram_ce"] / n,
            "majority_accuracy": sums["majority_correct"] / n,
            "loss_below_unigram": sums["unigram_ce"] / n - loss,
            "masked_share": sums["targets"] / max(sums["tokens"], 1.0),
            "targets_per_update": sums["targets"],
        }

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["tokens_per_s"] = sums["tokens"] / max(seconds, 1e-9)
        self.history.append(dict(rec, step=step))
        after = max(2 * self.cfg.schedule.warmup_updates(self.cfg.train.max_steps), 1)
        recent = self.history[-3:]
        if (
            len(recent) == 3
            and recent[0]["step"] > after
            and all(r["loss_below_unigram"] <= 0 for r in recent)
        ):
            return [(
                "mlm_not_below_unigram",
                f"MLM loss {rec['loss']:.3f} nats is not below the unigram cross-entropy of the units "
                f"({rec['unigram_ce']:.3f}) since step {int(recent[0]['step'])}: the BERT predicts the unit "
                "frequencies, not from context (more updates, a higher lr, dedup or BPE of the units; "
                "docs/units.md)",
            )]  # fmt: skip
        return []

    def eval_batch(self, model: nn.Module, batch: UnitBatch) -> dict[str, float]:
        return self._stats(masked_lm_objective(model, batch, self.cfg.model, self.corpus.dictionary), batch)

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        rec = self.record(sums)
        return rec, rec["loss"]

    def export(self, model: nn.Module, directory: Path) -> None:
        """transformers ``save_pretrained`` + dictionary (+ BPE) + ``unit_bert.json``."""
        assert isinstance(model, UnitMaskedLM)
        save_unit_bert(model, self.corpus, directory)


def pretrain_unit_bert(
    cfg: UnitBertRunConfig,
    exp_dir: str | Path,
    *,
    require_resume: bool = False,
    stop_at_step: int | None = None,
) -> Any:
    """Pretrain (or resume) a unit BERT; returns the loop's ``RunSummary``.

    ``exp_dir/best_model`` (:func:`speechvq.units.bert.load_unit_bert` reads it) is written at the end.
    """
    from speechvq.train.lock import experiment_lock
    from speechvq.train.loop import train

    with experiment_lock(exp_dir):  # the task writes the dictionary before the loop starts
        task = UnitBertTask(cfg, Path(exp_dir))
        return train(task, cfg, exp_dir, require_resume=require_resume, stop_at_step=stop_at_step)
