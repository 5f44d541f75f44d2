"""vq-wav2vec pretraining (Baevski et al., 2019) as a task of the one training loop.

The model (:class:`~speechvq.models.vq_wav2vec.VqWav2VecModel`) predicts the quantized encoder
output ``offset + s`` frames ahead for ``s < prediction_steps`` from a causal conv aggregator, and
is trained with fairseq's ``wav2vec`` criterion: binary cross-entropy of the true future frame
against K distractors from the same utterance, summed over the (frame, step) targets, plus the
quantizer's own loss (k-means codebook + commitment; or, for Gumbel, a diversity weight that the
paper leaves at 0). The loop normalises by the number of targets, as fairseq's ``sample_size``.

Randomness: the distractors are drawn from the batch slot's generator and the Gumbel noise and
dropout from the global RNG that the loop seeds per batch slot, so a resumed run repeats them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechvq.config import VqWav2VecConfig
from speechvq.data.collate import AudioBatch
from speechvq.errors import UserInputError
from speechvq.losses import contrastive_accuracy
from speechvq.losses_wav2vec import future_prediction_accuracy
from speechvq.models.kmeans_quantizer import KMeansVectorQuantizer
from speechvq.models.vq_wav2vec import VqWav2VecModel, VqWav2VecOutput, build_vq_wav2vec, vq_min_input_samples
from speechvq.train.config import PretrainConfig, dump_config
from speechvq.train.diagnostics import collapse_warnings
from speechvq.train.tasks.base import DataParts
from speechvq.train.tasks.pretrain import (
    code_counts,
    code_persistence_sums,
    collapse_check_start,
    end_usage_interval,
    open_audio_data,
    sum_over_processes,
)


def bce_chance(num_negatives: int) -> float:
    """BCE per target of a model that knows only the label rate (1 positive in K + 1):
    ``ln(K + 1) + K ln(1 + 1/K)``, the value a model that cannot tell targets apart reaches."""
    k = num_negatives
    return math.log(k + 1) + k * math.log1p(1 / k)


class VqWav2VecPretrainTask:
    """vq-wav2vec pretraining: future-step BCE + quantizer loss, codebook usage and collapse checks.

    Args:
        cfg: the validated pretraining config (``model.type: vq_wav2vec``).
        exp_dir: where ``codebook_usage.json`` goes.
        model: train this model instead of building one from ``cfg`` (tests).
    """

    name = "pretrain"
    stat_names = ("loss", "contrastive", "diversity", "targets", "correct", "counted", "binary_right",
                  "binary_pairs", "code_perplexity", "prob_perplexity", "batches", "frames", "samples",
                  "same_code_pairs", "frame_pairs", "nonfinite")  # fmt: skip
    eval_stat_names = stat_names
    lower_is_better = True
    export_name = "best_model"
    find_unused_parameters = False

    def __init__(self, cfg: PretrainConfig, exp_dir: Path, model: VqWav2VecModel | None = None) -> None:
        self.cfg, self.exp_dir, self._model = cfg, exp_dir, model
        self.model_cfg: VqWav2VecConfig = cfg.model_config()
        self.usage = torch.zeros(*self.model_cfg.codebook_shape, dtype=torch.long)
        self.temperature = float("nan")
        self._kmeans: KMeansVectorQuantizer | None = None
        self.history: list[dict[str, float]] = []
        self._world = 1

    def config_yaml(self) -> str:
        return dump_config(self.cfg)

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        model = saved.get("model") or {}
        if model.get("type", "wav2vec2") != "vq_wav2vec" or model.get("config") != self.model_cfg.to_dict():
            raise UserInputError(f"{where}/config.yaml: the model config differs from the one given")

    def build_model(self) -> nn.Module:
        return self._model if self._model is not None else build_vq_wav2vec(self.model_cfg)

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> DataParts:
        if train:
            self._world = num_replicas
        shortest = vq_min_input_samples(self.model_cfg)  # one frame
        return open_audio_data(
            self.cfg, path, train=train, num_replicas=num_replicas, rank=rank, min_samples=shortest
        )

    def on_update(self, model: nn.Module, step: int) -> None:
        model.set_num_updates_(step)  # Gumbel temperature from the update count

    def _stats(
        self, model: VqWav2VecModel, out: VqWav2VecOutput, batch: AudioBatch
    ) -> tuple[Tensor, dict[str, float]]:
        losses = model.compute_loss(out)
        logits = out.logits.detach()
        correct, counted = contrastive_accuracy(logits)
        right, pairs = future_prediction_accuracy(logits)
        s = {
            "loss": float(losses.total.detach()),
            "contrastive": float(losses.contrastive.detach()),
            "diversity": float(losses.diversity.detach()),
            "targets": float(losses.num_targets),
            "correct": float(correct),
            "counted": float(counted),
            "binary_right": float(right),
            "binary_pairs": float(pairs),
            "code_perplexity": float(out.quantizer.code_perplexity.detach()),
            "prob_perplexity": float(out.quantizer.prob_perplexity.detach()),
            "batches": 1.0,
            "frames": float(out.lengths.sum()),
            "samples": float(batch.lengths.sum()),
            **code_persistence_sums(out),
        }
        s["nonfinite"] = 0.0 if math.isfinite(s["loss"]) else 1.0
        return losses.total, s

    def batch_loss(
        self,
        module: Callable[..., Any],
        model: nn.Module,
        batch: AudioBatch,
        *,
        generator: torch.Generator,
        update_generator: torch.Generator,
    ) -> tuple[Tensor, dict[str, float]]:
        quantizer = model.quantizer
        self._kmeans = quantizer if isinstance(quantizer, KMeansVectorQuantizer) else None
        if self._world > 1 and model.cross_process_sum is None:
            # the quantizer's statistics (Gumbel perplexities, k-means usage) over the whole batch
            model.set_cross_process_sum_(sum_over_processes)
        out = module(batch.waveforms, batch.lengths, generator=generator)
        self.usage += code_counts(out, *self.usage.shape)
        self.temperature = float(out.quantizer.temperature)
        return self._stats(model, out, batch)

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-target losses (nats, bits), rank and binary accuracy, perplexities, persistence."""
        n = max(sums["targets"], 1.0)
        b = max(sums["batches"], 1.0)
        rec = {name: sums[name] / n for name in ("loss", "contrastive", "diversity")}
        rec["loss_bits"] = rec["loss"] / math.log(2)
        rec["accuracy"] = sums["correct"] / max(sums["counted"], 1.0)
        rec["binary_accuracy"] = sums["binary_right"] / max(sums["binary_pairs"], 1.0)
        rec["code_perplexity"] = sums["code_perplexity"] / b
        rec["prob_perplexity"] = sums["prob_perplexity"] / b
        rec["code_persistence"] = sums["same_code_pairs"] / max(sums["frame_pairs"], 1.0)
        rec["targets_per_update"] = n
        return rec

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["temperature"] = self.temperature
        rec["audio_s_per_s"] = sums["samples"] / self.cfg.data.sample_rate / max(seconds, 1e-9)
        rec.update(usage_by_group(self.usage))
        if self._kmeans is not None:
            rec["dead_codes"] = float(self._kmeans.num_dead_codes())
        self.history.append(dict(rec))
        end_usage_interval(self.exp_dir, step, self.usage, main)
        found = collapse_warnings(
            self.history,
            num_negatives=self.model_cfg.num_negatives,
            num_codebooks=self.model_cfg.codebook_shape[0],
            cfg=self.cfg.diagnostics,
            chance_after_steps=collapse_check_start(self.cfg),
            chance=(bce_chance(self.model_cfg.num_negatives), "of a model that only knows the label rate"),
        )
        return [(w.code, w.message) for w in found]

    def eval_batch(self, model: nn.Module, batch: AudioBatch) -> dict[str, float]:
        generator = torch.Generator(device=batch.waveforms.device).manual_seed(0)
        out = model(batch.waveforms, batch.lengths, generator=generator)
        return self._stats(model, out, batch)[1]

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        rec = self.record(sums)
        return rec, rec["loss"]

    def export(self, model: nn.Module, directory: Path) -> None:
        from speechvq.io import save_pretrained

        save_pretrained(model, directory)


def usage_by_group(counts: Tensor) -> dict[str, float]:
    """Per codebook group: the perplexity of the codes picked (``code_perplexity_g<i>``) and the
    number of entries never picked (``unused_codes_g<i>``), from ``[G, V]`` pick counts."""
    rec: dict[str, float] = {}
    for g, row in enumerate(counts.double()):
        total = float(row.sum())
        if total <= 0:
            continue
        p = row / total
        entropy = -float((p[p > 0] * p[p > 0].log()).sum())
        rec[f"code_perplexity_g{g}"] = math.exp(entropy)
        rec[f"unused_codes_g{g}"] = float((row == 0).sum())
    return rec
