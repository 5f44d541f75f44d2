"""wav2vec 2.0 pretraining as a task of the one training loop, and what vq-wav2vec shares with it.

:func:`pretrain` builds the pretraining task of a config (this one, or
:class:`~speechvq.train.tasks.vq_wav2vec.VqWav2VecPretrainTask`) and runs it on
:func:`speechvq.train.loop.train`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.nn
from torch import Tensor, nn

from speechvq.data import AudioDataset, BucketBatchSampler, collate_audio
from speechvq.data.augment import build_augmenter
from speechvq.data.collate import AudioBatch
from speechvq.errors import UserInputError
from speechvq.files import write_atomic
from speechvq.losses import contrastive_accuracy
from speechvq.models.encoder import min_input_samples
from speechvq.models.wav2vec2 import Wav2Vec2Model, Wav2Vec2Output, build_wav2vec2
from speechvq.train.config import PretrainConfig, dump_config
from speechvq.train.diagnostics import collapse_warnings
from speechvq.train.tasks.base import DataParts, Task


class Wav2Vec2PretrainTask:
    """wav2vec 2.0 pretraining: contrastive + diversity + feature penalty, collapse diagnostics.

    Args:
        cfg: the validated pretraining config.
        exp_dir: where ``codebook_usage.json`` goes.
        model: train this model instead of building one from ``cfg`` (tests).
    """

    name = "pretrain"
    stat_names = ("loss", "contrastive", "diversity", "feature_penalty", "targets", "correct", "counted",
                  "code_perplexity", "prob_perplexity", "batches", "masked_frames", "frames", "samples",
                  "same_code_pairs", "frame_pairs", "nonfinite")  # fmt: skip
    eval_stat_names = stat_names
    lower_is_better = True
    export_name = "best_model"  # a speechvq model dir (save_pretrained) for units, convert, --init

    def __init__(self, cfg: PretrainConfig, exp_dir: Path, model: Wav2Vec2Model | None = None) -> None:
        self.cfg, self.exp_dir, self._model = cfg, exp_dir, model
        self.model_cfg = cfg.model_config()
        self.find_unused_parameters = (
            self.model_cfg.context.layer_drop_p > 0 or self.model_cfg.encoder.grad_mult == 0
        )
        self.usage = torch.zeros(*self.model_cfg.codebook_shape, dtype=torch.long)
        self.temperature = float("nan")
        self.history: list[dict[str, float]] = []
        self._world = 1

    def config_yaml(self) -> str:
        return dump_config(self.cfg)

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        if saved["model"]["config"] != self.model_cfg.to_dict():
            raise UserInputError(f"{where}/config.yaml: the model config differs from the one given")

    def build_model(self) -> nn.Module:
        return self._model if self._model is not None else build_wav2vec2(self.model_cfg)

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> DataParts:
        if train:
            self._world = num_replicas
        # an utterance shorter than one frame cannot be encoded: dropped (listed) or skipped (decoded)
        shortest = min_input_samples(self.model_cfg.encoder)
        return open_audio_data(
            self.cfg, path, train=train, num_replicas=num_replicas, rank=rank, min_samples=shortest
        )

    def on_update(self, model: nn.Module, step: int) -> None:
        model.set_num_updates_(step)  # Gumbel temperature from the update count

    def _stats(
        self, model: Wav2Vec2Model, out: Wav2Vec2Output, batch: AudioBatch
    ) -> tuple[Tensor, dict[str, float]]:
        losses = model.compute_loss(out)
        correct, counted = contrastive_accuracy(out.logits.detach())
        s = {
            name: float(getattr(losses, name).detach())
            for name in ("contrastive", "diversity", "feature_penalty")
        }
        s.update(
            loss=float(losses.total.detach()),
            targets=float(losses.num_targets),
            correct=float(correct),
            counted=float(counted),
            code_perplexity=float(out.quantizer.code_perplexity.detach()),
            prob_perplexity=float(out.quantizer.prob_perplexity.detach()),
            batches=1.0,
            masked_frames=float(out.mask.sum()),
            frames=float(out.lengths.sum()),
            **code_persistence_sums(out),
            samples=float(batch.lengths.sum()),
        )
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
        # Masks, distractors and Gumbel noise: one generator per utterance, seeded from the update
        # and the utterance's dataset index, so they do not depend on how the update's utterances
        # are split over processes and batches. Dropout draws from the global RNG the loop seeded.
        if self._world > 1 and model.cross_process_sum is None:
            model.set_cross_process_sum_(sum_over_processes)
        device = batch.waveforms.device
        base = update_generator.initial_seed()
        gens = [
            torch.Generator(device=device).manual_seed(_utterance_seed(base, int(i)))
            for i in batch.indices.tolist()
        ]
        out = module(
            batch.waveforms,
            batch.lengths,
            generator=gens,
            layer_drop_generator=update_generator,
            masked_only=True,  # the loss reads the last block at the masked frames only
        )
        self.usage += code_counts(out, *self.usage.shape)
        self.temperature = float(out.quantizer.temperature)
        return self._stats(model, out, batch)

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-target losses (nats and bits), accuracy, mean perplexities, masked fraction."""
        n = max(sums["targets"], 1.0)
        b = max(sums["batches"], 1.0)
        rec = {name: sums[name] / n for name in ("loss", "contrastive", "diversity", "feature_penalty")}
        rec["loss_bits"] = rec["loss"] / math.log(2)
        rec["contrastive_bits"] = rec["contrastive"] / math.log(2)
        rec["accuracy"] = sums["correct"] / max(sums["counted"], 1.0)
        rec["code_perplexity"] = sums["code_perplexity"] / b
        rec["prob_perplexity"] = sums["prob_perplexity"] / b
        rec["masked_fraction"] = sums["masked_frames"] / max(sums["frames"], 1.0)
        rec["code_persistence"] = sums["same_code_pairs"] / max(sums["frame_pairs"], 1.0)
        rec["targets_per_update"] = n
        return rec

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["temperature"] = self.temperature
        rec["audio_s_per_s"] = sums["samples"] / self.cfg.data.sample_rate / max(seconds, 1e-9)
        self.history.append(dict(rec))
        end_usage_interval(self.exp_dir, step, self.usage, main)
        found = collapse_warnings(
            self.history,
            num_negatives=self.model_cfg.loss.num_negatives,
            num_codebooks=self.model_cfg.codebook_shape[0],
            cfg=self.cfg.diagnostics,
            chance_after_steps=collapse_check_start(self.cfg),
        )
        return [(w.code, w.message) for w in found]

    def eval_batch(self, model: nn.Module, batch: AudioBatch) -> dict[str, float]:
        out = model(batch.waveforms, batch.lengths, masked_only=True)
        return self._stats(model, out, batch)[1]

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        rec = self.record(sums)
        return rec, rec["loss"]

    def export(self, model: nn.Module, directory: Path) -> None:
        from speechvq.io import save_pretrained

        save_pretrained(model, directory)


def open_audio_data(
    cfg: PretrainConfig, path: str, *, train: bool, num_replicas: int, rank: int, min_samples: int = 0
) -> DataParts:
    """Dataset (random crops and ``cfg.data.augment`` in training), batch sampler and collate
    function of a pretraining split, as ``cfg.data`` says; utterances shorter than ``min_samples``
    (one frame), or than that times the largest speed factor when training with speed
    perturbation, are left out."""
    d = cfg.data
    augment = build_augmenter(d.augment, d.sample_rate) if train else None  # never validation
    speed = d.augment.max_speed() if train else 1.0
    try:
        ds = AudioDataset(
            path,
            sample_rate=d.sample_rate,
            normalize=d.normalize,
            max_sample_size=d.max_sample_size,
            min_sample_size=max(d.min_sample_size or 0, math.ceil(min_samples * speed)),
            random_crop=train,
            seed=cfg.train.seed,
            raw_format=d.raw(),
            augment=augment,
        )
    except FileNotFoundError as err:
        raise UserInputError(f"{path}: {err}") from err
    if len(ds) == 0:
        raise UserInputError(f"{path}: no usable utterances (check min_sample_size)")
    sampler = BucketBatchSampler(
        ds.sizes, d.max_tokens, num_replicas=num_replicas, rank=rank, seed=cfg.train.seed,
        shuffle=train, max_sample_size=d.max_sample_size, grad_accum=cfg.train.grad_accum,
    )  # fmt: skip
    return ds, sampler, collate_audio


def _utterance_seed(update_seed: int, index: int) -> int:
    """Seed of one utterance's randomness in one update (a SeedSequence hash of both)."""
    state = np.random.SeedSequence([int(update_seed), 1_000_033, int(index)]).generate_state(1, np.uint64)
    return int(state[0] % (2**63))


def sum_over_processes(tensor: Tensor) -> Tensor:
    """Sum over the data-parallel processes, differentiably (the gradient is summed back)."""
    return torch.distributed.nn.functional.all_reduce(tensor)


def end_usage_interval(exp_dir: Path, step: int, usage: Tensor, main: bool) -> None:
    """Write the interval's ``[G, V]`` code counts to ``exp_dir/codebook_usage.json`` (on the main
    process, atomically) and reset them for the next interval."""
    if main:
        path = exp_dir / "codebook_usage.json"
        write_atomic(path, json.dumps({"step": step, "counts": usage.tolist()}) + "\n")
    usage.zero_()


def collapse_check_start(cfg: PretrainConfig) -> int:
    """The update after which a loss at chance is a warning: twice the warm-up, at least 500."""
    return max(500, 2 * cfg.schedule.warmup_updates(cfg.train.max_steps))


def code_persistence_sums(out: Any) -> dict[str, float]:
    """Consecutive valid frame pairs of a wav2vec 2.0 or vq-wav2vec output, and how many of them
    have the same code in every group.

    Their ratio, ``code_persistence``, says how predictable the targets are from their neighbours:
    about 1/V at a random initialisation (the random encoder's features vary from frame to frame),
    rising as the features become phonetic. A run whose contrastive loss sits at chance with a
    flat persistence has targets that no context can predict yet.
    """
    codes = out.quantizer.codes.detach()  # (B, T, G)
    same = (codes[:, 1:] == codes[:, :-1]).all(dim=-1)  # (B, T-1)
    valid = torch.arange(1, codes.size(1), device=codes.device)[None, :] < out.lengths[:, None]
    return {"same_code_pairs": float((same & valid).sum()), "frame_pairs": float(valid.sum())}


def code_counts(out: Wav2Vec2Output, num_codebooks: int, codebook_size: int) -> Tensor:
    """``[G, V]`` how often each entry was picked over the valid frames."""
    codes = out.quantizer.codes.detach()  # (B, T, G)
    valid = torch.arange(codes.size(1), device=codes.device)[None, :] < out.lengths[:, None]
    picked = codes[valid]  # (B, T, G) -> (n, G)
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    counts = torch.bincount((picked + offsets).reshape(-1), minlength=num_codebooks * codebook_size)
    return counts.view(num_codebooks, codebook_size).cpu()


def pretrain(
    cfg: PretrainConfig,
    exp_dir: str | Path,
    *,
    require_resume: bool = False,
    model: nn.Module | None = None,
    stop_at_step: int | None = None,
) -> Any:
    """Pretrain (or resume) a wav2vec 2.0 or vq-wav2vec model as ``cfg`` says, into ``exp_dir``.

    Args:
        cfg: the validated run config.
        exp_dir: experiment directory; if it holds checkpoints the run resumes from the newest.
        require_resume: raise if there is no checkpoint to resume from.
        model: train this model instead of building one from ``cfg`` (tests).
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.

    Returns:
        The loop's :class:`~speechvq.train.loop.RunSummary`.
    """
    from speechvq.train.loop import train
    from speechvq.train.tasks.vq_wav2vec import VqWav2VecPretrainTask  # it builds on this module

    task: Task
    if cfg.model.type == "vq_wav2vec":
        task = VqWav2VecPretrainTask(cfg, Path(exp_dir), model)  # type: ignore[arg-type]
    else:
        task = Wav2Vec2PretrainTask(cfg, Path(exp_dir), model)  # type: ignore[arg-type]
    return train(task, cfg, exp_dir, require_resume=require_resume, stop_at_step=stop_at_step)
