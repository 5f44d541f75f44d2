"""CTC fine-tuning of a pretrained wav2vec 2.0 model: the config and the task for the training loop.

The recipe is the paper's (section 4.3) and fairseq's ``base_*`` fine-tuning configs: a Linear
output layer over the letter (or sentencepiece) vocabulary on top of the pretrained Transformer;
the feature encoder never trains; for the first ``model.freeze_updates`` updates only the output
layer trains (:meth:`CtcModel.set_num_updates_`); time and channel masking and LayerDrop in
training; tri-stage learning rate.

Loss normalisation (fairseq ``sentence_avg``): the CTC loss (fp32, ``zero_infinity``) is summed over
the utterances of an update and divided by their number, so each utterance weighs the same
whatever its length. The loop does the division (``targets`` = utterances).

From scratch (``--init none``) the same architecture starts from random weights; then the feature
encoder trains too and nothing is frozen (freezing a random Transformer would only waste updates).
Validation decodes greedily and reports WER and CER; the best checkpoint is the one of lowest WER.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from speechvq.config import Wav2Vec2Config, preset
from speechvq.data import AudioDataset, BucketBatchSampler, collate_audio
from speechvq.data.audio import RawFormat
from speechvq.data.collate import AudioBatch
from speechvq.data.source import open_source
from speechvq.decoding import greedy_decode
from speechvq.errors import UserInputError
from speechvq.files import read_text
from speechvq.metrics_asr import char_errors, word_errors
from speechvq.models.ctc import (
    CtcModel,
    build_ctc_model,
    ctc_config_from_wav2vec2,
    from_pretrained_wav2vec2,
    save_ctc_pretrained,
)
from speechvq.models.encoder import min_input_samples
from speechvq.models.wav2vec2 import Wav2Vec2Model, build_wav2vec2
from speechvq.ranges import check_probability, check_range
from speechvq.text.vocab import Vocabulary
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import (
    OptimSection,
    ScheduleSection,
    TrainSection,
    check_sampling,
    config_from_dict,
    parse_yaml,
    plain,
)
from speechvq.train.task import DataParts

logger = logging.getLogger(__name__)

VOCAB_NAME = "vocab.json"
"""The run's vocabulary, written into the experiment directory on the first start."""


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


@dataclass(kw_only=True)
class MaskSection:
    """Training-time masking (:class:`~speechvq.config.MaskConfig`)."""

    mask_prob: float = 0.65
    """Time masking: #spans = mask_prob * T / mask_length."""
    mask_length: int = 10
    """Frames per time span."""
    min_masks: int = 2
    """At least this many time spans per utterance."""
    channel_prob: float = 0.25
    """Channel masking probability (0 disables it)."""
    channel_length: int = 64
    """Channels per channel span."""

    def validate(self) -> None:
        """Probabilities finite and >= 0 (channels: in [0, 1]), span lengths >= 1."""
        check_range("mask.mask_prob", self.mask_prob, 0)
        check_range("mask.mask_length", self.mask_length, 1, integer=True)
        check_range("mask.min_masks", self.min_masks, 0, integer=True)
        check_probability("mask.channel_prob", self.channel_prob)
        check_range("mask.channel_length", self.channel_length, 1, integer=True)


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

    def raw(self) -> RawFormat | None:
        """:attr:`raw_format` parsed (raises :class:`UserInputError` naming the problem)."""
        return None if self.raw_format is None else RawFormat.parse(str(self.raw_format))

    def validate(self, prefix: str = "data") -> None:
        """Sampling values and the sentencepiece size in range."""
        check_sampling(self, prefix)
        check_range(f"{prefix}.sentencepiece_vocab_size", self.sentencepiece_vocab_size, 1, integer=True)


@dataclass(kw_only=True)
class FinetuneScheduleSection(ScheduleSection):
    """As :class:`ScheduleSection`, tri-stage by default (10% warm-up, 40% hold, 50% decay)."""

    name: Literal["polynomial", "tri_stage", "cosine", "constant"] = "tri_stage"
    """See :class:`ScheduleSection`."""


@dataclass(kw_only=True)
class FinetuneConfig:
    """Everything a fine-tuning run reads (``conf/finetune_*.yaml``)."""

    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    mask: MaskSection = field(default_factory=MaskSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-5, eps=1e-8, weight_decay=0.0))
    schedule: FinetuneScheduleSection = field(default_factory=FinetuneScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """A YAML-safe dict."""
        return plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Cross-field checks; raises :class:`UserInputError`."""
        self.train.validate()
        self.schedule.validate()
        self.optim.validate()
        self.data.validate()
        self.model.validate()
        self.mask.validate()
        if not self.data.train:
            raise UserInputError("`data.train` must name a manifest, but is empty instead.")
        self.data.raw()

    def settings(self) -> dict[str, Any]:
        """Keyword settings for :func:`ctc_config_from_wav2vec2`."""
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if k not in MODEL_CHOICE_FIELDS}
        return {**model, "mask": dataclasses.asdict(self.mask)}


# -- --init --------------------------------------------------------------------------------------------


def scratch_architecture(model: FinetuneModelSection, init: str | None) -> Wav2Vec2Config:
    """The architecture a from-scratch run trains: ``--init``'s with its weights dropped
    (``model.random_weights``), else the preset's with ``model.encoder_kind``."""
    if init is not None:
        return load_init_model(init).cfg
    arch = preset(model.preset)
    if model.encoder_kind is not None:
        arch.encoder = dataclasses.replace(arch.encoder, kind=model.encoder_kind)
    return arch


def load_init_model(spec: str) -> Wav2Vec2Model:
    """The pretrained wav2vec 2.0 model named by ``--init``.

    Args:
        spec: a speechvq model directory, a pretraining experiment directory (its best checkpoint,
            else its newest), a checkpoint directory or a ``checkpoints`` directory, a transformers
            model directory, or a fairseq ``.pt`` checkpoint.

    Raises:
        UserInputError: if nothing usable is there.
    """
    path = Path(spec)
    if not path.exists():
        raise UserInputError(f"{spec}: --init not found (give a model, experiment or checkpoint, or 'none')")
    if path.is_file():
        from speechvq.interop.fairseq import import_fairseq

        model = import_fairseq(path)
    elif (path / "checkpoints").is_dir() or ckpt.list_checkpoints(path):
        model = _from_checkpoint(
            _pick_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        )
    elif (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        model = _from_checkpoint(path)
    elif _is_speechvq_dir(path):
        from speechvq.io import load_pretrained

        model = load_pretrained(path)
    elif (path / "config.json").is_file():
        from speechvq.interop.hf import load_hf

        model = load_hf(path)
    else:
        raise UserInputError(f"{spec}: not a model, experiment or checkpoint directory")
    if not isinstance(model, Wav2Vec2Model):
        raise UserInputError(f"{spec}: holds a {type(model).__name__}, not a pretrained wav2vec 2.0 model")
    return model


def _is_speechvq_dir(path: Path) -> bool:
    from speechvq.io import read_config

    try:
        read_config(path)
    except UserInputError:
        return False
    return True


def _pick_checkpoint(root: Path) -> Path:
    path = ckpt.best_checkpoint(root)
    if path is None:
        raise UserInputError(f"{root}: no checkpoint")
    return path


def _from_checkpoint(path: Path) -> Wav2Vec2Model:
    """Rebuild the pretraining model of a ``train/checkpoint.py`` directory.

    The checkpoint is verified (every sha256) before any of its files is parsed.
    """
    problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise ckpt.CorruptCheckpointError(f"{path}: {problem}")
    try:
        saved = parse_yaml(read_text(path / "config.yaml", "checkpoint config"), f"{path}/config.yaml")
        w2v_cfg: Wav2Vec2Config = config_from_dict(saved).model_config()
    except (UserInputError, TypeError, ValueError, KeyError) as err:
        raise UserInputError(f"{path}/config.yaml: not a pretraining checkpoint config: {err}") from err
    if not isinstance(w2v_cfg, Wav2Vec2Config):
        raise UserInputError(
            f"{path}: a vq-wav2vec checkpoint; CTC fine-tuning starts from wav2vec 2.0 (for vq-wav2vec, "
            "export its units and fine-tune a unit BERT: docs/units.md)"
        )
    model = build_wav2vec2(w2v_cfg)
    try:
        model.load_state_dict(ckpt.load_checkpoint(path)[0])
    except RuntimeError as err:
        raise UserInputError(
            f"{path}/model.safetensors: the weights do not fit its config ({str(err).splitlines()[0][:200]})"
        ) from None
    return model


# -- the task ------------------------------------------------------------------------------------------


def _text(value: str | bytes | None) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else (value or "")


def ltr_to_words(line: str) -> str:
    """``"H I | T H E R E |"`` -> ``"HI THERE"``."""
    return " ".join("".join(line.split()).replace("|", " ").split())


class CtcTask:
    """CTC fine-tuning for :func:`speechvq.train.loop.train` (see the module docstring).

    Args:
        cfg: the validated fine-tuning config.
        init: ``--init`` (see :func:`load_init_model`), or None to train from scratch.
        exp_dir: the experiment directory (``vocab.json`` is kept there for resumes).
        main: whether this process writes files.
    """

    name = "finetune-ctc"
    stat_names = ("loss", "targets", "tokens", "samples", "nonfinite")
    eval_stat_names = ("loss", "utterances", "word_errors", "words", "char_errors", "chars", "oov_refs")
    lower_is_better = True
    export_name = "best_model"
    find_unused_parameters = True  # the frozen body and LayerDrop leave parameters without gradient

    def __init__(self, cfg: FinetuneConfig, init: str | None, exp_dir: Path, *, main: bool = True) -> None:
        self.cfg, self.init, self.main = cfg, init, main
        self.oov_seen: set[str] = set()
        self._oov_warned = False
        self.vocab = self._vocabulary(exp_dir / VOCAB_NAME, main)
        settings = cfg.settings()
        if init is None or cfg.model.random_weights:
            self._pretrained = None
            arch = scratch_architecture(cfg.model, init)
            self.ctc_cfg = ctc_config_from_wav2vec2(arch, len(self.vocab), **settings)
            self.ctc_cfg = dataclasses.replace(
                self.ctc_cfg,
                encoder=dataclasses.replace(self.ctc_cfg.encoder, grad_mult=1.0),
                freeze_updates=0,
            )
        else:
            self._pretrained = load_init_model(init)
            num_layers = self._pretrained.cfg.context.num_layers
            if cfg.model.reinit_layers > num_layers:
                raise UserInputError(
                    f"`model.reinit_layers` must be at most {num_layers} (the blocks of {init}), "
                    f"but is {cfg.model.reinit_layers} instead."
                )
            self.ctc_cfg = ctc_config_from_wav2vec2(self._pretrained.cfg, len(self.vocab), **settings)

    def _vocabulary(self, path: Path, main: bool) -> Vocabulary:
        if path.is_file():
            return Vocabulary.load(path)
        d = self.cfg.data
        source = open_source(d.train, d.labels)
        lines, bad = [], []
        for i in range(len(source)):
            try:
                lines.append(_text(source.text(i)))
            except UnicodeDecodeError:
                bad.append(i + 1)
        if bad:  # the dataset skips (and counts) these utterances in training too
            logger.warning(
                "%s: %d transcript line(s) are not UTF-8 (line %s%s); left out of the vocabulary, "
                "their utterances are skipped",
                d.train, len(bad), bad[0], f" and {len(bad) - 1} more" if len(bad) > 1 else "",
            )  # fmt: skip
        if not any(line.strip() for line in lines):
            raise UserInputError(
                f"{d.train}: no usable transcript ({d.labels} labels) to build a vocabulary from"
            )
        words = [ltr_to_words(x) for x in lines] if d.labels == "ltr" else lines
        if d.vocab == "sentencepiece":
            vocab = Vocabulary.train_sentencepiece(
                words,
                d.sentencepiece_vocab_size,
                model_type=d.sentencepiece_model_type,
                seed=self.cfg.train.seed,
            )
        else:
            vocab = Vocabulary.from_ltr(lines) if d.labels == "ltr" else Vocabulary.letters(words)
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            vocab.save(path)
        return vocab

    def encode(self, text: str) -> list[int]:
        """Target ids of one label line."""
        if self.cfg.data.labels == "ltr" and self.vocab.kind == "letters":
            return self.vocab.encode_ltr(text)
        return self.vocab.encode(ltr_to_words(text) if self.cfg.data.labels == "ltr" else text)

    def words(self, text: str) -> str:
        """The reference words of one label line."""
        return ltr_to_words(text) if self.cfg.data.labels == "ltr" else " ".join(text.split())

    def config_yaml(self) -> str:
        data = self.cfg.to_dict()
        data["init"] = self.init
        data["ctc_model"] = self.ctc_cfg.to_dict()
        return yaml.safe_dump(data, sort_keys=False)

    def check_resume(self, saved: dict[str, Any], where: Path) -> None:
        if saved.get("ctc_model") != self.ctc_cfg.to_dict():
            raise UserInputError(f"{where}/config.yaml: the model config differs from the one given")

    def build_model(self) -> nn.Module:
        if self._pretrained is None:
            return build_ctc_model(self.ctc_cfg)
        model = from_pretrained_wav2vec2(
            self._pretrained,
            len(self.vocab),
            reinit_layers=self.cfg.model.reinit_layers,
            **self.cfg.settings(),
        )
        self._pretrained = None  # free it
        return model

    def open_data(self, path: str, *, train: bool, num_replicas: int, rank: int) -> DataParts:
        d = self.cfg.data
        try:
            ds = AudioDataset(
                path, sample_rate=d.sample_rate, random_crop=False, labels=d.labels, seed=self.cfg.train.seed,
                min_sample_size=min_input_samples(self.ctc_cfg.encoder),  # shorter: no frame to encode
                raw_format=d.raw(),
            )  # fmt: skip
        except FileNotFoundError as err:
            raise UserInputError(f"{path}: {err}") from err
        if len(ds) == 0:
            raise UserInputError(f"{path}: no usable utterances")
        try:  # no cropping: a transcript belongs to the whole utterance
            sampler = BucketBatchSampler(
                ds.sizes, d.max_tokens, num_replicas=num_replicas, rank=rank, seed=self.cfg.train.seed,
                shuffle=train,
            )  # fmt: skip
        except ValueError as err:
            raise UserInputError(f"{path}: {err} (raise data.max_tokens)") from None
        return ds, sampler, collate_audio

    def on_update(self, model: nn.Module, step: int) -> None:
        model.set_num_updates_(step)  # the body trains from model.freeze_updates on

    def _targets(self, batch: AudioBatch, device: torch.device) -> tuple[Tensor, Tensor]:
        ids = [torch.tensor(self.encode(_text(t)), dtype=torch.long) for t in batch.texts or []]
        lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        padded = (
            nn.utils.rnn.pad_sequence(ids, batch_first=True) if ids else torch.zeros(0, 0, dtype=torch.long)
        )
        return padded.to(device), lengths.to(device)

    def batch_loss(
        self,
        module: Callable[..., Any],
        model: nn.Module,
        batch: AudioBatch,
        *,
        generator: torch.Generator,
        update_generator: torch.Generator,
    ) -> tuple[Tensor, dict[str, float]]:
        # masks and LayerDrop draw from the batch slot's generator (ranks may drop different blocks)
        targets, target_lengths = self._targets(batch, batch.waveforms.device)
        out = module(batch.waveforms, batch.lengths, generator=generator)
        loss = model.compute_loss(out, targets, target_lengths)  # fp32, zero_infinity, summed
        value = float(loss.detach())
        stats = {
            "loss": value,
            "targets": float(len(batch)),  # sentence_avg: normalise per utterance
            "tokens": float(target_lengths.sum()),
            "samples": float(batch.lengths.sum()),
            "nonfinite": 0.0 if math.isfinite(value) else 1.0,
        }
        return loss, stats

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """CTC loss per utterance and per target token."""
        return {
            "loss": sums["loss"] / max(sums["targets"], 1.0),
            "loss_per_token": sums["loss"] / max(sums["tokens"], 1.0),
            "utterances_per_update": sums["targets"],
        }

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["audio_s_per_s"] = sums["samples"] / self.cfg.data.sample_rate / max(seconds, 1e-9)
        return []

    def eval_batch(self, model: nn.Module, batch: AudioBatch) -> dict[str, float]:
        targets, target_lengths = self._targets(batch, batch.waveforms.device)
        out = model(batch.waveforms, batch.lengths)
        loss = float(model.compute_loss(out, targets, target_lengths))
        refs = [self.words(_text(t)) for t in batch.texts or []]
        hyps = greedy_decode(out.logits.float(), out.lengths, self.vocab)
        we, ce = word_errors(refs, hyps), char_errors(refs, hyps)
        return {
            "loss": loss,
            "utterances": float(len(batch)),
            "word_errors": float(we.errors),
            "words": float(we.reference_length),
            "char_errors": float(ce.errors),
            "chars": float(ce.reference_length),
            "oov_refs": float(self.count_oov(batch.texts or [])),
        }

    def count_oov(self, texts: list[str]) -> int:
        """References among ``texts`` that hold units outside the vocabulary (they become ``<unk>``,
        which the model can never output); their characters are remembered for the warning."""
        count = 0
        for text in texts:
            ids = self.encode(_text(text))
            if self.vocab.unk_id in ids:
                count += 1
                if self.vocab.kind == "letters":
                    known = set(self.vocab.tokens)
                    self.oov_seen.update(
                        c for c in self.words(_text(text)) if not c.isspace() and c not in known
                    )
        return count

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        rec = {
            "loss": sums["loss"] / max(sums["utterances"], 1.0),
            "wer": sums["word_errors"] / max(sums["words"], 1.0),
            "cer": sums["char_errors"] / max(sums["chars"], 1.0),
        }
        oov = int(sums.get("oov_refs", 0))
        if oov and self.main and not self._oov_warned:
            self._oov_warned = True
            shown = "".join(sorted(self.oov_seen)[:20])
            logger.warning(
                "validation: %d of %d references hold letters outside the training vocabulary%s; they "
                "can never be recognised and count as errors in every WER/CER",
                oov, int(sums["utterances"]), f" ({shown!r})" if shown else "",
            )  # fmt: skip
        return rec, rec[self.cfg.data.best_metric]

    def export(self, model: nn.Module, directory: Path) -> None:
        """The best model with its vocabulary, for ``speechvq transcribe`` and ``convert``."""
        assert isinstance(model, CtcModel)
        save_ctc_pretrained(model, self.vocab, directory)


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
        init: ``--init`` (see :func:`load_init_model`), or None to train from scratch.
        exp_dir: the experiment directory; ``exp_dir/best_model`` is exported at the end.
        require_resume: raise if there is no checkpoint to resume from.
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.
    """
    from speechvq.train.lock import experiment_lock
    from speechvq.train.loop import train

    main = int(os.environ.get("RANK", "0")) == 0  # accelerate's state is not set up yet
    with experiment_lock(exp_dir):  # the task writes vocab.json before the loop starts
        task = CtcTask(cfg, init, Path(exp_dir), main=main)
        return train(task, cfg, exp_dir, require_resume=require_resume, stop_at_step=stop_at_step)
