"""CTC on unit-BERT features (vq-wav2vec section 5.2) as a task of the one training loop.

The model, tokenizer and data are :mod:`speechvq.units.ctc`'s and :mod:`speechvq.units.ctc_data`'s.
What every CTC run shares comes from :mod:`speechvq.train.tasks.ctc`, composed rather than
inherited: the vocabulary (kept in ``exp_dir/vocab.json``), the encoding of the label lines, the
training record, greedy decoding with WER/CER validation and the best-by-WER score. The loss is the
CTC loss summed over the utterances; the loop divides by their number (fairseq ``sentence_avg``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from speechvq.errors import UserInputError
from speechvq.text.vocab import VOCAB_NAME
from speechvq.train.finetune import UnitCtcRunConfig
from speechvq.train.tasks.base import DataParts
from speechvq.train.tasks.ctc import (
    CtcScorer,
    Transcripts,
    build_vocabulary,
    ctc_batch_stats,
    ctc_record,
    length_sampler,
)
from speechvq.units.bert import CONFIG_NAME as UNIT_BERT_CONFIG_NAME
from speechvq.units.bert import find_unit_bert, load_unit_bert, read_unit_bert_config
from speechvq.units.ctc import UnitBertCtcModel, build_unit_bert_ctc, save_unit_bert_ctc
from speechvq.units.ctc_data import (
    UnitCtcBatch,
    UnitTokenizer,
    UnitTranscriptDataset,
    collate_unit_transcripts,
)


class UnitBertCtcTask:
    """CTC on unit-BERT features for :func:`speechvq.train.loop.train` (see the module docstring).

    Args:
        cfg: the validated run config.
        init: the unit-BERT export (or ``pretrain-unit-bert`` experiment directory).
        exp_dir: the experiment directory.
        main: whether this process writes files.
    """

    name = "finetune-ctc-units"
    stat_names = ("loss", "targets", "tokens", "frames", "nonfinite")
    eval_stat_names = CtcScorer.stat_names
    lower_is_better = True
    export_name = "best_model"
    find_unused_parameters = True  # the frozen BERT leaves parameters without gradient

    def __init__(self, cfg: UnitCtcRunConfig, init: str, exp_dir: Path, *, main: bool = True) -> None:
        root = find_unit_bert(init)
        if root is None:
            raise UserInputError(f"{init}: not a unit BERT export (no {UNIT_BERT_CONFIG_NAME})")
        self.cfg, self.init, self.main = cfg, str(root), main
        self.vocab = build_vocabulary(cfg.data, cfg.train.seed, exp_dir / VOCAB_NAME, main)
        self.transcripts = Transcripts(self.vocab, cfg.data.labels)
        self.scorer = CtcScorer(self.transcripts, cfg.data.best_metric, main)
        self._bert: nn.Module | None
        self._bert, dictionary, bpe = load_unit_bert(root)
        bert_cfg = read_unit_bert_config(root)
        self.tokenizer = UnitTokenizer(dictionary, bpe, dedup=bert_cfg.dedup)
        self.model_cfg = cfg.model_config(vocab_size=len(self.vocab), max_positions=bert_cfg.max_positions)

    def config_yaml(self) -> str:
        data = self.cfg.to_dict()
        data["init"] = self.init
        data["unit_ctc_model"] = self.model_cfg.to_dict()
        return yaml.safe_dump(data, sort_keys=False)

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        if saved.get("unit_ctc_model") != self.model_cfg.to_dict():
            raise UserInputError(f"{where}/config.yaml: the model config differs from the one given")

    def build_model(self) -> nn.Module:
        if self._bert is None:
            raise RuntimeError("`build_model` must be called once, but is called again.")
        model = build_unit_bert_ctc(self.model_cfg, self._bert, self.tokenizer.dictionary)
        self._bert = None  # the model owns it now
        return model.train()

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> DataParts:
        d = self.cfg.data
        units = d.train_units if train else d.valid_units
        assert units is not None
        ds = UnitTranscriptDataset(path, units, self.tokenizer, d.labels)
        if len(ds) == 0:
            raise UserInputError(f"{units}: no utterance has units")
        sampler = length_sampler(
            ds.sizes, d.max_tokens, num_replicas=num_replicas, rank=rank, seed=self.cfg.train.seed,
            shuffle=train, where=units, grad_accum=self.cfg.train.grad_accum,
        )  # fmt: skip
        collate = functools.partial(collate_unit_transcripts, pad_id=self.tokenizer.dictionary.pad_id)
        return ds, sampler, collate

    def on_update(self, model: nn.Module, step: int) -> None:
        model.set_num_updates_(step)  # the BERT trains from model.freeze_updates on

    def batch_loss(
        self,
        module: Callable[..., Any],
        model: nn.Module,
        batch: UnitCtcBatch,
        *,
        generator: torch.Generator,
        update_generator: torch.Generator,
    ) -> tuple[Tensor, dict[str, float]]:
        # dropout draws from the global RNG the loop seeded per batch slot
        targets, target_lengths = self.transcripts.targets(batch.texts, batch.ids.device)
        out = module(batch.ids, batch.lengths, batch.repeats)
        loss = model.compute_loss(out, targets, target_lengths)  # fp32, zero_infinity, summed
        return loss, ctc_batch_stats(loss, len(batch), target_lengths, frames=float(out.lengths.sum()))

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """CTC loss per utterance and per target token."""
        return ctc_record(sums)

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["frames_per_s"] = sums["frames"] / max(seconds, 1e-9)
        return []

    def eval_batch(self, model: nn.Module, batch: UnitCtcBatch) -> dict[str, float]:
        targets, target_lengths = self.transcripts.targets(batch.texts, batch.ids.device)
        out = model(batch.ids, batch.lengths, batch.repeats)
        loss = float(model.compute_loss(out, targets, target_lengths))
        return self.scorer.batch_stats(loss, out.log_probs, out.lengths, batch.texts)

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        return self.scorer.record(sums)

    def export(self, model: nn.Module, directory: Path) -> None:
        """The best model with its vocabulary and tokenizer (:func:`~speechvq.units.ctc.load_unit_bert_ctc` reads it)."""
        assert isinstance(model, UnitBertCtcModel)
        save_unit_bert_ctc(model, self.vocab, self.tokenizer, directory)
