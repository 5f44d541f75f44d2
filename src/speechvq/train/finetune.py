"""CTC fine-tuning runs: their configs (``conf/finetune_*.yaml``) and entry points.

Two front ends: a pretrained (or from-scratch) wav2vec 2.0 model on the waveform
(:class:`FinetuneConfig`, :func:`finetune`), or the features of a unit BERT on discrete units
(:class:`UnitCtcRunConfig`, :func:`finetune_unit_bert_ctc`; vq-wav2vec section 5.2, see
:mod:`speechvq.units.ctc`).

The recipe is the paper's (section 4.3) and fairseq's ``base_*`` fine-tuning configs: a Linear
output layer over the letter (or sentencepiece) vocabulary on top of the pretrained Transformer;
the feature encoder never trains; for the first ``model.freeze_updates`` updates only the output
layer trains (:meth:`CtcModel.set_num_updates_`); time and channel masking and LayerDrop in
training; tri-stage learning rate. The task is :class:`~speechvq.train.tasks.ctc.CtcTask`;
``--init`` is read by :func:`speechvq.interop.init.load_init_model`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from speechvq.config import MaskConfig, finetune_mask
from speechvq.data.audio import RawFormat
from speechvq.data.augment import AugmentConfig
from speechvq.errors import UserInputError
from speechvq.ranges import check_probability, check_range
from speechvq.train.sections import (
    OptimSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
    check_sampling,
)
from speechvq.units.ctc import UnitBertCtcConfig, UnitCtcModelSection

MODEL_CHOICE_FIELDS = ("preset", "encoder_kind", "reinit_layers", "random_weights")
"""Fields of :class:`FinetuneModelSection` that choose the model (architecture, which weights are
copied) rather than set :class:`~speechvq.models.ctc.CtcConfig`."""


@dataclass(kw_only=True)
class FinetuneModelSection:
    """Fine-tuning settings of :class:`~speechvq.models.ctc.CtcConfig`; the architecture comes from ``--init``."""

    preset: str = "base"
    """Architecture when training from scratch (``--init none``); ignored otherwise."""
    encoder_kind: Literal["conv", "fbank"] | None = None
    """Front end when training from scratch (``model.encoder.kind``; None: the preset's), so that a
    from-scratch baseline can match a pretrained model's architecture; ignored with ``--init``."""
    freeze_updates: int = 10000
    """Updates during which only the output layer trains (fairseq ``freeze_finetune_updates``)."""
    reinit_layers: int = 0
    """Re-initialise the top this many pretrained Transformer blocks instead of copying them (they
    then train from random weights, and so need ``freeze_updates: 0``); ignored without ``--init``."""
    random_weights: bool = False
    """With ``--init``: take its architecture (front end, sizes, waveform normalisation) but none of
    its weights, and train everything from random initialisation, as ``--init none`` does. This is
    the from-scratch baseline of exactly the model that was pretrained; ``reinit_layers`` and
    ``freeze_updates`` then do not apply."""
    dropout_p: float = 0.0
    """Transformer dropout."""
    attention_dropout_p: float = 0.0
    """Attention dropout."""
    activation_dropout_p: float = 0.1
    """Dropout after the feed-forward activation."""
    layer_drop_p: float = 0.1
    """LayerDrop."""
    feature_dropout_p: float = 0.0
    """Dropout on the projected features (fairseq ``dropout_input``)."""
    final_dropout_p: float = 0.0
    """Dropout before the output layer."""
    normalize_waveform: bool = False
    """Per-utterance waveform normalisation inside the model; must match pretraining."""

    def validate(self) -> None:
        """Counts >= 0 and dropout probabilities in [0, 1]."""
        check_range("model.freeze_updates", self.freeze_updates, 0, integer=True)
        check_range("model.reinit_layers", self.reinit_layers, 0, integer=True)
        for name in DROPOUT_FIELDS:
            check_probability(f"model.{name}", getattr(self, name))


DROPOUT_FIELDS = (
    "dropout_p",
    "attention_dropout_p",
    "activation_dropout_p",
    "layer_drop_p",
    "feature_dropout_p",
    "final_dropout_p",
)


def validate_mask(mask: MaskConfig, prefix: str = "mask") -> None:
    """Probabilities finite and >= 0 (channels: in [0, 1]), span lengths >= 1."""
    check_range(f"{prefix}.mask_prob", mask.mask_prob, 0)
    check_range(f"{prefix}.mask_length", mask.mask_length, 1, integer=True)
    check_range(f"{prefix}.min_masks", mask.min_masks, 0, integer=True)
    check_probability(f"{prefix}.channel_prob", mask.channel_prob)
    check_range(f"{prefix}.channel_length", mask.channel_length, 1, integer=True)


@dataclass(kw_only=True)
class LabelSection:
    """Where the transcripts are and what the model outputs (shared by every CTC data section)."""

    valid: str | None = None
    """Validation manifest; None disables validation (the last checkpoint is then exported)."""
    best_metric: Literal["wer", "cer", "loss"] = "wer"
    """Validation score that picks the best checkpoint (lower is better; fairseq
    ``best_checkpoint_metric``). Use ``cer`` while the WER is near 100%, as after a few CPU minutes
    on 10 minutes of labels: there it does not rank checkpoints at all."""
    labels: str = "ltr"
    """Transcripts. For a manifest: the suffix of the label file beside it, ``ltr`` (fairseq
    letters, ``|`` ends a word), ``wrd`` or any other (words). For a dataset directory (or parquet):
    the name of its text column, e.g. ``text`` (words; letters only for a column named ``ltr``)."""
    vocab: Literal["letters", "sentencepiece"] = "letters"
    """Output units: letters, or a sentencepiece model trained on the training transcripts."""
    sentencepiece_vocab_size: int = 1000
    """Sentencepiece vocabulary size (an upper bound on a small corpus)."""
    sentencepiece_model_type: Literal["unigram", "bpe"] = "unigram"
    """Sentencepiece algorithm."""


@dataclass(kw_only=True)
class FinetuneDataSection(LabelSection):
    """Labelled data, vocabulary and batching."""

    train: str = ""
    """Training manifest (TSV) or dataset directory."""
    sample_rate: int = 16000
    """Sample rate the audio is resampled to."""
    max_tokens: int = 3200000
    """Samples per batch per process, padding included."""
    num_workers: int = 0
    """DataLoader worker processes."""
    raw_format: str | None = None
    """How headerless files are read (``RATE[:CHANNELS[:SUBTYPE[:ENDIAN]]]``); see
    :attr:`speechvq.train.config.DataSection.raw_format`."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """On-the-fly augmentation of the training split (never validation); all off by default. See
    :class:`speechvq.data.augment.AugmentConfig` and *Augmentation* in ``docs/training.md``."""

    def raw(self) -> RawFormat | None:
        """:attr:`raw_format` parsed (raises :class:`UserInputError` naming the problem)."""
        return None if self.raw_format is None else RawFormat.parse(str(self.raw_format))

    def validate(self, prefix: str = "data") -> None:
        """Sampling values, the sentencepiece size and the augmentation in range."""
        check_sampling(self, prefix)
        self.augment.validate(f"{prefix}.augment")
        check_range(f"{prefix}.sentencepiece_vocab_size", self.sentencepiece_vocab_size, 1, integer=True)


@dataclass(kw_only=True)
class FinetuneScheduleSection(ScheduleSection):
    """As :class:`ScheduleSection`, tri-stage by default (10% warm-up, 40% hold, 50% decay)."""

    name: Literal["polynomial", "tri_stage", "cosine", "constant"] = "tri_stage"
    """See :class:`ScheduleSection`."""


@dataclass(kw_only=True)
class FinetuneConfig(RunConfig):
    """Everything a fine-tuning run reads (``conf/finetune_*.yaml``)."""

    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    mask: MaskConfig = field(default_factory=finetune_mask)
    """Training-time masking: the fields of the pretraining model's ``mask`` (*Model: masking*),
    with fine-tuning's defaults (:func:`finetune_mask`: ``channel_prob`` 0.25, ``channel_length`` 64;
    the rest as in pretraining)."""
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-5, eps=1e-8, weight_decay=0.0))
    schedule: FinetuneScheduleSection = field(default_factory=FinetuneScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> None:
        """Cross-field checks; raises :class:`UserInputError`."""
        self.validate_run()
        self.data.validate()
        self.model.validate()
        validate_mask(self.mask)
        if not self.data.train:
            raise UserInputError("`data.train` must name a manifest, but is empty instead.")
        self.data.raw()

    def settings(self) -> dict[str, Any]:
        """Keyword settings for :func:`ctc_config_from_wav2vec2`."""
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if k not in MODEL_CHOICE_FIELDS}
        return {**model, "mask": dataclasses.asdict(self.mask)}


@dataclass(kw_only=True)
class UnitCtcDataSection(LabelSection):
    """Labelled units: manifests (for the labels and the utterance order), units, vocabulary, batching."""

    train: str = ""
    """Training manifest; its ``.ltr``/``.wrd`` label file lies beside it."""
    train_units: str = ""
    """Units of the training manifest (``speechvq export-units`` directory, same order)."""
    valid_units: str | None = None
    """Units of the validation manifest."""
    max_tokens: int = 20000
    """Frames per batch per process, padding included."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass(kw_only=True)
class UnitCtcRunConfig(RunConfig):
    """Everything a unit-BERT CTC run reads (``conf/finetune_units_*.yaml``)."""

    model: UnitCtcModelSection = field(default_factory=UnitCtcModelSection)
    data: UnitCtcDataSection = field(default_factory=UnitCtcDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-4, eps=1e-8, weight_decay=0.0))
    schedule: FinetuneScheduleSection = field(default_factory=FinetuneScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> None:
        """Cross-field checks; raises :class:`UserInputError`."""
        self.validate_run()
        check_sampling(self.data, "data")
        check_range("model.freeze_updates", self.model.freeze_updates, 0, integer=True)
        check_range("model.head_dim", self.model.head_dim, 1, integer=True)
        check_range("model.head_heads", self.model.head_heads, 1, integer=True)
        check_range("model.head_ffn_dim", self.model.head_ffn_dim, 1, integer=True)
        check_probability("model.dropout_p", self.model.dropout_p)
        check_probability("model.final_dropout_p", self.model.final_dropout_p)
        d = self.data
        if not d.train:
            raise UserInputError("`data.train` must name a manifest, but is empty instead.")
        if not d.train_units:
            raise UserInputError(
                "`data.train_units` must name a units directory (--units), but is empty instead."
            )
        if d.valid and not d.valid_units:
            raise UserInputError(
                "`data.valid_units` must name the units of data.valid (--valid-units), but is empty instead."
            )
        try:
            self.model_config(vocab_size=2, max_positions=3)
        except ValueError as err:
            raise UserInputError(str(err)) from None

    def model_config(self, *, vocab_size: int, max_positions: int) -> UnitBertCtcConfig:
        """The model config for a vocabulary and a BERT."""
        section = dataclasses.asdict(self.model)
        return UnitBertCtcConfig(**section, vocab_size=vocab_size, max_positions=max_positions)


def finetune(
    cfg: FinetuneConfig,
    init: str | None,
    exp_dir: str | Path,
    *,
    require_resume: bool = False,
    stop_at_step: int | None = None,
) -> Any:
    """Fine-tune (or resume) with CTC as ``cfg`` says; returns the loop's ``RunSummary``.

    Args:
        cfg: the validated config (``data.train`` / ``data.valid`` already set).
        init: ``--init`` (see :func:`~speechvq.train.init_model.load_init_model`), or None to train from scratch.
        exp_dir: the experiment directory; ``exp_dir/best_model`` is exported at the end.
        require_resume: raise if there is no checkpoint to resume from.
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.
    """
    from speechvq.train.lock import experiment_lock
    from speechvq.train.loop import train
    from speechvq.train.tasks.ctc import CtcTask

    main = int(os.environ.get("RANK", "0")) == 0  # accelerate's state is not set up yet
    with experiment_lock(exp_dir):  # the task writes vocab.json before the loop starts
        task = CtcTask(cfg, init, Path(exp_dir), main=main)
        return train(task, cfg, exp_dir, require_resume=require_resume, stop_at_step=stop_at_step)


def finetune_unit_bert_ctc(
    cfg: UnitCtcRunConfig,
    init: str,
    exp_dir: str | Path,
    *,
    require_resume: bool = False,
    stop_at_step: int | None = None,
) -> Any:
    """Train (or resume) a CTC model on unit-BERT features; returns the loop's ``RunSummary``.

    Args:
        cfg: the validated config (``data.train``/``train_units``, ``data.valid``/``valid_units``).
        init: the unit-BERT export (see :func:`~speechvq.units.bert.find_unit_bert`).
        exp_dir: the experiment directory; ``exp_dir/best_model`` is exported at the end.
        require_resume: raise if there is no checkpoint to resume from.
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.
    """
    from speechvq.train.lock import experiment_lock
    from speechvq.train.loop import train
    from speechvq.train.tasks.unit_ctc import UnitBertCtcTask

    main = int(os.environ.get("RANK", "0")) == 0
    with experiment_lock(exp_dir):  # the task writes vocab.json before the loop starts
        task = UnitBertCtcTask(cfg, init, Path(exp_dir), main=main)
        return train(task, cfg, exp_dir, require_resume=require_resume, stop_at_step=stop_at_step)
