"""CTC fine-tuning of a pretrained wav2vec 2.0 model as a task of the one training loop.

Loss normalisation (fairseq ``sentence_avg``): the CTC loss (fp32, ``zero_infinity``) is summed over
the utterances of an update and divided by their number, so each utterance weighs the same
whatever its length. The loop does the division (``targets`` = utterances).

From scratch (``--init none``) the same architecture starts from random weights; then the feature
encoder trains too and nothing is frozen (freezing a random Transformer would only waste updates).
Validation decodes greedily and reports WER and CER; the best checkpoint is the one of lowest WER.
The config is :class:`~speechvq.train.finetune.FinetuneConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from speechvq.config import Wav2Vec2Config, preset
from speechvq.data import AudioDataset, BucketBatchSampler, collate_audio
from speechvq.data.augment import build_augmenter
from speechvq.data.collate import AudioBatch
from speechvq.data.source import label_text, open_source
from speechvq.decoding import greedy_decode
from speechvq.errors import UserInputError
from speechvq.metrics_asr import char_errors, word_errors
from speechvq.models.ctc import (
    CtcModel,
    build_ctc_model,
    ctc_config_from_wav2vec2,
    from_pretrained_wav2vec2,
    save_ctc_pretrained,
)
from speechvq.models.encoder import min_input_samples
from speechvq.text.vocab import VOCAB_NAME, Vocabulary
from speechvq.train.finetune import (
    FinetuneConfig,
    FinetuneDataSection,
    FinetuneModelSection,
    UnitCtcDataSection,
)
from speechvq.train.init_model import load_init_model
from speechvq.train.tasks.base import DataParts

logger = logging.getLogger(__name__)


def scratch_architecture(model: FinetuneModelSection, init: str | None) -> Wav2Vec2Config:
    """The architecture a from-scratch run trains: ``--init``'s with its weights dropped
    (``model.random_weights``), else the preset's with ``model.encoder_kind``."""
    if init is not None:
        return load_init_model(init).cfg
    arch = preset(model.preset)
    if model.encoder_kind is not None:
        arch.encoder = dataclasses.replace(arch.encoder, kind=model.encoder_kind)
    return arch


def ltr_to_words(line: str) -> str:
    """``"H I | T H E R E |"`` -> ``"HI THERE"``."""
    return " ".join("".join(line.split()).replace("|", " ").split())


# -- pieces every CTC task composes: vocabulary, targets, batching, validation scoring --------------


def build_vocabulary(
    data: FinetuneDataSection | UnitCtcDataSection, seed: int, path: Path, main: bool
) -> Vocabulary:
    """The run's output vocabulary: read from ``path`` (a resumed run), else built from the
    training transcripts as ``data`` says (letters or sentencepiece) and written there (``main``).

    Args:
        data: a CTC data section (``train``, ``labels``, ``vocab``, sentencepiece settings).
        seed: sentencepiece's seed.
        path: the experiment's ``vocab.json``.
        main: whether this process writes files.
    """
    if path.is_file():
        return Vocabulary.load(path)
    lines = _transcript_lines(data.train, data.labels)
    if not any(line.strip() for line in lines):
        raise UserInputError(
            f"{data.train}: no usable transcript ({data.labels} labels) to build a vocabulary from"
        )
    words = [ltr_to_words(x) for x in lines] if data.labels == "ltr" else lines
    if data.vocab == "sentencepiece":
        vocab = Vocabulary.train_sentencepiece(
            words, data.sentencepiece_vocab_size, model_type=data.sentencepiece_model_type, seed=seed
        )
    else:
        vocab = Vocabulary.from_ltr(lines) if data.labels == "ltr" else Vocabulary.letters(words)
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        vocab.save(path)
    return vocab


def _transcript_lines(train: str, labels: str) -> list[str]:
    """The UTF-8 transcripts of a training set; the others are left out with one warning (the
    dataset skips, and counts, their utterances in training too)."""
    source = open_source(train, labels)
    lines, bad = [], []
    for i in range(len(source)):
        try:
            lines.append(label_text(source.text(i)))
        except UnicodeDecodeError:
            bad.append(i + 1)
    if bad:
        logger.warning(
            "%s: %d transcript line(s) are not UTF-8 (line %s%s); left out of the vocabulary, "
            "their utterances are skipped",
            train, len(bad), bad[0], f" and {len(bad) - 1} more" if len(bad) > 1 else "",
        )  # fmt: skip
    return lines


class Transcripts:
    """Label lines -> CTC target ids and reference words, for one vocabulary.

    Args:
        vocab: the output vocabulary.
        labels: the label kind (``ltr``: fairseq letters; anything else: words).
    """

    def __init__(self, vocab: Vocabulary, labels: str) -> None:
        self.vocab, self.labels = vocab, labels
        self.oov_seen: set[str] = set()
        """Characters outside a letter vocabulary seen in references (for the warning)."""

    def encode(self, text: str) -> list[int]:
        """Target ids of one label line."""
        if self.labels == "ltr" and self.vocab.kind == "letters":
            return self.vocab.encode_ltr(text)
        return self.vocab.encode(ltr_to_words(text) if self.labels == "ltr" else text)

    def words(self, text: str) -> str:
        """The reference words of one label line."""
        return ltr_to_words(text) if self.labels == "ltr" else " ".join(text.split())

    def targets(self, texts: Sequence[str | bytes | None], device: torch.device) -> tuple[Tensor, Tensor]:
        """(``[B, L]`` padded target ids, ``[B]`` target lengths) of a batch's label lines."""
        ids = [torch.tensor(self.encode(label_text(t)), dtype=torch.long) for t in texts]
        lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        padded = (
            nn.utils.rnn.pad_sequence(ids, batch_first=True) if ids else torch.zeros(0, 0, dtype=torch.long)
        )
        return padded.to(device), lengths.to(device)

    def count_oov(self, texts: Sequence[str | bytes | None]) -> int:
        """References among ``texts`` that hold units outside the vocabulary (they become ``<unk>``,
        which the model can never output); their characters are remembered in :attr:`oov_seen`."""
        count = 0
        for text in texts:
            ids = self.encode(label_text(text))
            if self.vocab.unk_id in ids:
                count += 1
                if self.vocab.kind == "letters":
                    known = set(self.vocab.tokens)
                    self.oov_seen.update(
                        c for c in self.words(label_text(text)) if not c.isspace() and c not in known
                    )
        return count


class CtcScorer:
    """Validation of a CTC task: greedy decoding, WER/CER sums, and the record and score of their totals.

    Args:
        transcripts: the references' encoding.
        best_metric: the score that picks the best checkpoint (``wer``, ``cer`` or ``loss``).
        main: whether this process logs the out-of-vocabulary warning.
    """

    stat_names = ("loss", "utterances", "word_errors", "words", "char_errors", "chars", "oov_refs")

    def __init__(self, transcripts: Transcripts, best_metric: str, main: bool) -> None:
        self.transcripts, self.best_metric, self.main = transcripts, best_metric, main
        self._oov_warned = False

    def batch_stats(
        self, loss: float, scores: Tensor, lengths: Tensor, texts: Sequence[str | bytes | None]
    ) -> dict[str, float]:
        """Sums of one validation batch from its loss, ``[B, T, V]`` frame scores and ``[B]`` frames."""
        refs = [self.transcripts.words(label_text(t)) for t in texts]
        hyps = greedy_decode(scores, lengths, self.transcripts.vocab)
        we, ce = word_errors(refs, hyps), char_errors(refs, hyps)
        return {
            "loss": loss,
            "utterances": float(len(texts)),
            "word_errors": float(we.errors),
            "words": float(we.reference_length),
            "char_errors": float(ce.errors),
            "chars": float(ce.reference_length),
            "oov_refs": float(self.transcripts.count_oov(texts)),
        }

    def record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        """(loss per utterance, WER, CER; the ``best_metric`` of them) of summed statistics."""
        rec = {
            "loss": sums["loss"] / max(sums["utterances"], 1.0),
            "wer": sums["word_errors"] / max(sums["words"], 1.0),
            "cer": sums["char_errors"] / max(sums["chars"], 1.0),
        }
        oov = int(sums.get("oov_refs", 0))
        if oov and self.main and not self._oov_warned:
            self._oov_warned = True
            shown = "".join(sorted(self.transcripts.oov_seen)[:20])
            logger.warning(
                "validation: %d of %d references hold letters outside the training vocabulary%s; they "
                "can never be recognised and count as errors in every WER/CER",
                oov, int(sums["utterances"]), f" ({shown!r})" if shown else "",
            )  # fmt: skip
        return rec, rec[self.best_metric]


def ctc_batch_stats(
    loss: Tensor, utterances: int, target_lengths: Tensor, **extra: float
) -> dict[str, float]:
    """Training sums of one batch: the summed loss, ``targets`` = utterances (fairseq
    ``sentence_avg``: each utterance weighs the same), target tokens, ``nonfinite``, and ``extra``."""
    value = float(loss.detach())
    return {
        "loss": value,
        "targets": float(utterances),
        "tokens": float(target_lengths.sum()),
        **extra,
        "nonfinite": 0.0 if math.isfinite(value) else 1.0,
    }


def ctc_record(sums: dict[str, float]) -> dict[str, float]:
    """CTC loss per utterance and per target token of summed training statistics."""
    return {
        "loss": sums["loss"] / max(sums["targets"], 1.0),
        "loss_per_token": sums["loss"] / max(sums["tokens"], 1.0),
        "utterances_per_update": sums["targets"],
    }


def length_sampler(
    sizes: Any,
    max_tokens: int,
    *,
    num_replicas: int,
    rank: int,
    seed: int,
    shuffle: bool,
    where: str,
    grad_accum: int = 1,
) -> BucketBatchSampler:
    """Length-bucketed batches of whole utterances (a transcript belongs to the whole utterance, so
    nothing is cropped); an utterance longer than ``max_tokens`` is an error naming ``where``."""
    try:
        return BucketBatchSampler(
            sizes, max_tokens, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle,
            grad_accum=grad_accum,
        )  # fmt: skip
    except ValueError as err:
        raise UserInputError(f"{where}: {err} (raise data.max_tokens)") from None


# -- the task ------------------------------------------------------------------------------------------


class CtcTask:
    """CTC fine-tuning for :func:`speechvq.train.loop.train` (see the module docstring).

    Args:
        cfg: the validated fine-tuning config.
        init: ``--init`` (see :func:`~speechvq.train.init_model.load_init_model`), or None to
            train from scratch.
        exp_dir: the experiment directory (``vocab.json`` is kept there for resumes).
        main: whether this process writes files.
    """

    name = "finetune-ctc"
    stat_names = ("loss", "targets", "tokens", "samples", "nonfinite")
    eval_stat_names = CtcScorer.stat_names
    lower_is_better = True
    export_name = "best_model"
    find_unused_parameters = True  # the frozen body and LayerDrop leave parameters without gradient

    def __init__(self, cfg: FinetuneConfig, init: str | None, exp_dir: Path, *, main: bool = True) -> None:
        self.cfg, self.init, self.main = cfg, init, main
        self.vocab = build_vocabulary(cfg.data, cfg.train.seed, exp_dir / VOCAB_NAME, main)
        self.transcripts = Transcripts(self.vocab, cfg.data.labels)
        self.scorer = CtcScorer(self.transcripts, cfg.data.best_metric, main)
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
        # shorter (after the fastest speed perturbation, in training): no frame to encode
        shortest = math.ceil(
            min_input_samples(self.ctc_cfg.encoder) * (d.augment.max_speed() if train else 1.0)
        )
        try:
            ds = AudioDataset(
                path, sample_rate=d.sample_rate, random_crop=False, labels=d.labels, seed=self.cfg.train.seed,
                min_sample_size=shortest, raw_format=d.raw(),
                augment=build_augmenter(d.augment, d.sample_rate) if train else None,  # never validation
            )  # fmt: skip
        except FileNotFoundError as err:
            raise UserInputError(f"{path}: {err}") from err
        if len(ds) == 0:
            raise UserInputError(f"{path}: no usable utterances")
        sampler = length_sampler(
            ds.sizes, d.max_tokens, num_replicas=num_replicas, rank=rank, seed=self.cfg.train.seed,
            shuffle=train, where=path, grad_accum=self.cfg.train.grad_accum,
        )  # fmt: skip
        return ds, sampler, collate_audio

    def on_update(self, model: nn.Module, step: int) -> None:
        model.set_num_updates_(step)  # the body trains from model.freeze_updates on

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
        targets, target_lengths = self.transcripts.targets(batch.texts or [], batch.waveforms.device)
        out = module(batch.waveforms, batch.lengths, generator=generator)
        loss = model.compute_loss(out, targets, target_lengths)  # fp32, zero_infinity, summed
        return loss, ctc_batch_stats(loss, len(batch), target_lengths, samples=float(batch.lengths.sum()))

    def record(self, sums: dict[str, float]) -> dict[str, float]:
        """CTC loss per utterance and per target token."""
        return ctc_record(sums)

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["audio_s_per_s"] = sums["samples"] / self.cfg.data.sample_rate / max(seconds, 1e-9)
        return []

    def eval_batch(self, model: nn.Module, batch: AudioBatch) -> dict[str, float]:
        texts = batch.texts or []
        targets, target_lengths = self.transcripts.targets(texts, batch.waveforms.device)
        out = model(batch.waveforms, batch.lengths)
        loss = float(model.compute_loss(out, targets, target_lengths))
        return self.scorer.batch_stats(loss, out.logits.float(), out.lengths, texts)

    def eval_record(self, sums: dict[str, float]) -> tuple[dict[str, float], float]:
        return self.scorer.record(sums)

    def export(self, model: nn.Module, directory: Path) -> None:
        """The best model with its vocabulary, for ``speechvq transcribe`` and ``convert``."""
        assert isinstance(model, CtcModel)
        save_ctc_pretrained(model, self.vocab, directory)
