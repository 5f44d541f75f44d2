"""BERT features for speech recognition: units -> unit-BERT layer -> acoustic head -> CTC (vq-wav2vec 5.2).

vq-wav2vec (Baevski et al. 2019, section 5.2) trains an acoustic model on the hidden states of a
BERT that was pretrained on the discrete units of the audio, instead of on log-mel features. Here
the same recipe runs on speechvq's parts:

1. the units of each utterance (a ``speechvq export-units`` directory, one line per manifest item)
   are tokenised as the unit BERT was trained: deduplicated or not (its ``unit_bert.json``), and
   split into acoustic BPE pieces if it has a ``bpe.model``; each token keeps the number of frames
   it stands for (``repeats``: run-length durations, times the units of a BPE piece);
2. :class:`~speechvq.units.features.UnitBertFeatures` gives the hidden states of one BERT layer,
   expanded back to frames by the repeats (frame lengths = the sum of the durations);
3. an acoustic head (:class:`AcousticHead`): a Linear projection, a few residual 1-D convolution
   blocks (``head: conv``, the default; vq-wav2vec feeds the BERT features to a wav2letter
   convolutional model) or pre-norm Transformer blocks with a convolutional position embedding
   (``head: transformer``), with dropout, and a Linear layer over the letter (or sentencepiece)
   vocabulary;
4. the CTC loss of :func:`speechvq.losses_ctc.ctc_loss` (fp32, ``zero_infinity``), summed over the
   utterances; the loop divides by their number (fairseq ``sentence_avg``).

The BERT runs without autograd for the first ``model.freeze_updates`` updates (only the head
trains, as the waveform CTC model freezes its body), or always with ``model.freeze_bert`` (then it
also stays in eval mode: fixed features, as vq-wav2vec extracted them once).

:class:`UnitBertCtcTask` plugs this into :func:`speechvq.train.loop.train` with the labels,
vocabulary, greedy decoding, WER/CER validation and best-by-WER checkpoint of
:class:`~speechvq.train.finetune.CtcTask`; ``speechvq finetune-ctc`` runs it when ``--init`` is a
unit BERT (see :mod:`speechvq.commands.finetune_ctc`). The export (:func:`save_unit_bert_ctc`)
is read back by :func:`load_unit_bert_ctc`, and :func:`transcribe_units` decodes a units
directory with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speechvq.data import BucketBatchSampler
from speechvq.data.source import open_source
from speechvq.decoding import greedy_decode
from speechvq.errors import UserInputError
from speechvq.files import read_json
from speechvq.io import replace_directory
from speechvq.losses_ctc import ctc_loss
from speechvq.metrics_asr import char_errors, word_errors
from speechvq.models.common import Conv1d, Linear
from speechvq.ranges import check_probability, check_range
from speechvq.text.vocab import Vocabulary
from speechvq.train.config import OptimSection, TrainSection, check_sampling, plain
from speechvq.train.finetune import (
    VOCAB_NAME,
    CtcTask,
    FinetuneScheduleSection,
    LabelSection,
    _text,
)
from speechvq.train.task import DataParts
from speechvq.units.bert import (
    BASE_DICT_NAME,
    BPE_NAME,
    DICT_NAME,
    UnitBertConfig,
    load_unit_bert,
)
from speechvq.units.bert import CONFIG_NAME as UNIT_BERT_CONFIG_NAME
from speechvq.units.dictionary import UnitBpe, UnitDictionary
from speechvq.units.features import UnitBertFeatures
from speechvq.units.io import UNITS_NAME, UTTS_NAME, read_units, run_length_encode

logger = logging.getLogger(__name__)

CONFIG_NAME = "unit_bert_ctc.json"
"""The export's config: model settings, vocabulary, tokenizer settings and the BERT's config."""
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "unit_bert_ctc"


# -- config --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class UnitCtcModelSection:
    """Fine-tuning settings of the unit-BERT CTC model; the BERT itself comes from ``--init``."""

    layer: int | None = None
    """BERT layer whose hidden states are the features: 0 = embeddings, ``l`` = block ``l``
    (1-based), None = the last block. Blocks above it are dropped."""
    freeze_updates: int = 1000
    """Updates during which the BERT runs without autograd and only the head trains."""
    freeze_bert: bool = False
    """Never train the BERT (and keep it in eval mode: fixed features)."""
    head: Literal["conv", "transformer"] = "conv"
    """Acoustic head blocks: residual 1-D convolutions (wav2letter-like) or pre-norm Transformer blocks."""
    head_dim: int = 256
    """Width of the head (the Linear projection maps the BERT's width to it)."""
    head_layers: int = 3
    """Number of head blocks (0: projection + output layer only)."""
    head_kernel: int = 5
    """Kernel size (odd) of the convolutions (the position embedding of the Transformer head)."""
    head_heads: int = 4
    """Attention heads of the Transformer head."""
    head_ffn_dim: int = 1024
    """Feed-forward width of the Transformer head."""
    dropout_p: float = 0.1
    """Dropout inside the head (after the projection and in every block)."""
    final_dropout_p: float = 0.0
    """Dropout before the output layer."""


@dataclass(kw_only=True)
class UnitBertCtcConfig(UnitCtcModelSection):
    """Everything that builds a :class:`UnitBertCtcModel` around a unit BERT."""

    vocab_size: int = 32
    """V, output units including the blank."""
    blank_id: int = 0
    """Index of the CTC blank."""
    max_positions: int = 512
    """The BERT's longest input (``<s>``/``</s>`` included); longer inputs run in windows."""

    def __post_init__(self) -> None:
        if self.head not in ("conv", "transformer"):
            raise ValueError(f"`head` must be 'conv' or 'transformer', but is {self.head!r} instead.")
        if self.head_kernel < 1 or self.head_kernel % 2 == 0:
            raise ValueError(f"`head_kernel` must be odd and positive, but is {self.head_kernel} instead.")
        if self.head_layers < 0:
            raise ValueError(f"`head_layers` must be >= 0, but is {self.head_layers} instead.")
        if self.head == "transformer" and self.head_dim % self.head_heads:
            raise ValueError(
                f"`head_dim` must be a multiple of `head_heads` ({self.head_heads}), "
                f"but is {self.head_dim} instead."
            )
        if self.freeze_updates < 0:
            raise ValueError(f"`freeze_updates` must be >= 0, but is {self.freeze_updates} instead.")
        if not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(
                f"`blank_id` must be in [0, vocab_size={self.vocab_size}), but is {self.blank_id} instead."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitBertCtcConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown field(s) {unknown} for UnitBertCtcConfig")
        return cls(**data)


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
class UnitCtcRunConfig:
    """Everything a unit-BERT CTC run reads (``conf/finetune_units_*.yaml``)."""

    model: UnitCtcModelSection = field(default_factory=UnitCtcModelSection)
    data: UnitCtcDataSection = field(default_factory=UnitCtcDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-4, eps=1e-8, weight_decay=0.0))
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


# -- tokenizer -----------------------------------------------------------------------------------------


class UnitTokenizer:
    """Units -> BERT token ids and the frames each token stands for, as the unit BERT was trained.

    Args:
        dictionary: the BERT's dictionary (of units, or of BPE pieces).
        bpe: its acoustic BPE, or None.
        dedup: whether the BERT was trained on deduplicated units.
    """

    def __init__(self, dictionary: UnitDictionary, bpe: UnitBpe | None, *, dedup: bool) -> None:
        self.dictionary, self.bpe, self.dedup = dictionary, bpe, dedup

    def encode(self, frames: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame units -> (``[N]`` int64 token ids, ``[N]`` int64 frames per token).

        The repeats sum to ``len(frames)``.
        """
        if self.dedup:
            values, durations = run_length_encode(list(frames))
            units, counts = [str(v) for v in values], np.asarray(durations, dtype=np.int64)
        else:
            units, counts = [str(f) for f in frames], np.ones(len(frames), dtype=np.int64)
        tokens = units
        if self.bpe is not None and units:
            tokens = self.bpe.encode(units)
            widths = np.asarray(self.bpe.piece_lengths(tokens), dtype=np.int64)
            if int(widths.sum()) != len(units):
                raise ValueError(f"BPE pieces cover {int(widths.sum())} units, but there are {len(units)}.")
            starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
            counts = np.add.reduceat(counts, starts)  # frames of each piece's units
        ids = self.dictionary.encode(tokens, add_specials=False)
        return ids, counts


def tokenizer_of(
    directory: str | os.PathLike[str], dictionary: UnitDictionary, bpe: UnitBpe | None
) -> UnitTokenizer:
    """The tokenizer of a unit-BERT export (its ``unit_bert.json`` says whether it saw deduplicated units)."""
    return UnitTokenizer(dictionary, bpe, dedup=_unit_bert_config(Path(directory)).dedup)


def _unit_bert_config(root: Path) -> UnitBertConfig:
    path = root / UNIT_BERT_CONFIG_NAME
    if not path.exists():
        raise UserInputError(f"{path}: file does not exist (not a unit BERT export)")
    try:
        return UnitBertConfig.from_dict(read_json(path, "unit BERT config")["config"])
    except UserInputError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{path}: invalid unit BERT config: {err}") from None


def find_unit_bert(spec: str | os.PathLike[str]) -> Path | None:
    """The unit-BERT export named by ``--init``, or None if ``spec`` is something else.

    Accepts an export (a directory with ``unit_bert.json``, written by ``pretrain-unit-bert``) or
    a ``pretrain-unit-bert`` experiment directory (its ``best_model``).
    """
    path = Path(spec)
    for candidate in (path, path / "best_model"):
        if (candidate / UNIT_BERT_CONFIG_NAME).is_file():
            return candidate
    return None


# -- model ---------------------------------------------------------------------------------------------


@dataclass
class UnitCtcOutput:
    """Output of :meth:`UnitBertCtcModel.forward`."""

    log_probs: Tensor
    """``[B, T, V]`` fp32 log-probabilities per frame (frames past each length mean nothing)."""
    lengths: Tensor
    """``[B]`` valid frames per utterance (the sum of each utterance's repeats)."""


def _valid_frames(lengths: Tensor, frames: int) -> Tensor:
    """``[B]`` lengths -> ``[B, T]`` bool, True at valid frames."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class ConvBlock(nn.Module):
    """``x + dropout(gelu(conv(x)))`` then LayerNorm, over ``[B, T, D]``; padding is zeroed before the conv."""

    def __init__(self, dim: int, kernel: int, dropout_p: float) -> None:
        super().__init__()
        self.conv = Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.dropout = nn.Dropout(dropout_p)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x * valid[..., None].to(x.dtype)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D) -> (B, D, T) -> (B, T, D)
        return self.norm(x + self.dropout(nn.functional.gelu(y)))


class TransformerBlocks(nn.Module):
    """A depthwise convolutional position embedding, then pre-norm Transformer blocks and a LayerNorm."""

    def __init__(
        self, dim: int, layers: int, heads: int, ffn_dim: int, kernel: int, dropout_p: float
    ) -> None:
        super().__init__()
        self.pos_conv = Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, ffn_dim, dropout_p, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x * valid[..., None].to(x.dtype)
        x = x + nn.functional.gelu(self.pos_conv(x.transpose(1, 2)).transpose(1, 2))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~valid)
        return self.norm(x)


class AcousticHead(nn.Module):
    """Linear projection -> dropout -> blocks -> dropout -> Linear over the vocabulary.

    Args:
        in_dim: the BERT's width.
        blocks: the head blocks (:class:`ConvBlock` list or :class:`TransformerBlocks`), or None.
        cfg: the config (widths, dropouts, vocabulary size).
    """

    def __init__(self, in_dim: int, blocks: nn.Module | None, cfg: UnitBertCtcConfig) -> None:
        super().__init__()
        self.proj = Linear(in_dim, cfg.head_dim)
        self.dropout = nn.Dropout(cfg.dropout_p)
        self.blocks = blocks
        self.final_dropout = nn.Dropout(cfg.final_dropout_p)
        self.out = Linear(cfg.head_dim, cfg.vocab_size)

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """``[B, T, D_bert]`` features, ``[B]`` frames -> ``[B, T, V]`` logits."""
        valid = _valid_frames(lengths, features.size(1))
        x = self.dropout(self.proj(features))
        if isinstance(self.blocks, nn.ModuleList):
            for block in self.blocks:
                x = block(x, valid)
        elif self.blocks is not None:
            x = self.blocks(x, valid)
        return self.out(self.final_dropout(x))


class UnitBertCtcModel(nn.Module):
    """Unit-BERT features + acoustic head, trained with CTC. Build it with :func:`build_unit_bert_ctc`.

    Args:
        features: the unit-BERT front end.
        head: the acoustic head.
        cfg: the config the parts were built from.
    """

    model_type = MODEL_TYPE

    def __init__(self, features: UnitBertFeatures, head: AcousticHead, cfg: UnitBertCtcConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = features
        self.head = head
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if cfg.freeze_bert:
            for p in features.parameters():
                p.requires_grad_(False)

    def set_num_updates_(self, num_updates: int) -> None:
        """Set the update count that decides whether the BERT is still frozen."""
        self.num_updates.fill_(int(num_updates))

    @property
    def bert_frozen(self) -> bool:
        """True while the BERT runs without autograd."""
        return self.cfg.freeze_bert or int(self.num_updates) < self.cfg.freeze_updates

    def train(self, mode: bool = True) -> UnitBertCtcModel:
        super().train(mode)
        if self.cfg.freeze_bert:
            self.features.eval()  # fixed features: no dropout in the BERT
        return self

    def forward(self, ids: Tensor, lengths: Tensor, repeats: Tensor | None = None) -> UnitCtcOutput:
        """Frame log-probabilities over the vocabulary.

        Args:
            ids: ``[B, N]`` BERT token ids (no ``<s>``/``</s>``), any padding value.
            lengths: ``[B]`` tokens per utterance.
            repeats: ``[B, N]`` frames per token (None: one each).

        Returns:
            :class:`UnitCtcOutput` (``log_probs [B, T, V]``, ``lengths [B]``).
        """
        with torch.no_grad() if self.bert_frozen else contextlib.nullcontext():
            feats, frame_lengths = self.features(ids, lengths, repeats)
        logits = self.head(feats, frame_lengths)
        return UnitCtcOutput(log_probs=torch.log_softmax(logits.float(), dim=-1), lengths=frame_lengths)

    def compute_loss(
        self, output: UnitCtcOutput, targets: Tensor, target_lengths: Tensor, reduction: str = "sum"
    ) -> Tensor:
        """CTC loss (fp32, ``zero_infinity``; see :func:`speechvq.losses_ctc.ctc_loss`)."""
        return ctc_loss(
            output.log_probs, output.lengths, targets, target_lengths, blank_id=self.cfg.blank_id,
            reduction=reduction,
        )  # fmt: skip


def build_unit_bert_ctc(
    cfg: UnitBertCtcConfig, masked_lm: nn.Module, dictionary: UnitDictionary
) -> UnitBertCtcModel:
    """A :class:`UnitBertCtcModel` over a (pretrained) unit BERT; the head is randomly initialised.

    Args:
        cfg: the model config.
        masked_lm: the unit BERT (transformers masked LM); its blocks above ``cfg.layer`` are dropped.
        dictionary: its dictionary.
    """
    features = UnitBertFeatures(masked_lm, dictionary, layer=cfg.layer, max_positions=cfg.max_positions)
    blocks: nn.Module | None = None
    if cfg.head_layers > 0 and cfg.head == "conv":
        blocks = nn.ModuleList(
            ConvBlock(cfg.head_dim, cfg.head_kernel, cfg.dropout_p) for _ in range(cfg.head_layers)
        )
    elif cfg.head_layers > 0:
        blocks = TransformerBlocks(
            cfg.head_dim, cfg.head_layers, cfg.head_heads, cfg.head_ffn_dim, cfg.head_kernel, cfg.dropout_p
        )
    return UnitBertCtcModel(features, AcousticHead(features.dim, blocks, cfg), cfg)


# -- export --------------------------------------------------------------------------------------------


def save_unit_bert_ctc(
    model: UnitBertCtcModel,
    vocab: Vocabulary,
    tokenizer: UnitTokenizer,
    directory: str | os.PathLike[str],
) -> Path:
    """Write ``model`` with everything that decodes units with it (atomically: a renamed temporary dir).

    Files: ``unit_bert_ctc.json`` (model config, vocabulary, tokenizer settings, the BERT's
    transformers config), ``model.safetensors`` (the truncated BERT and the head), the BERT's
    ``dict.txt`` (and ``dict.units.txt`` + ``bpe.model`` with BPE).
    """
    if len(vocab) != model.cfg.vocab_size:
        raise ValueError(f"`vocab` must have {model.cfg.vocab_size} tokens, but has {len(vocab)} instead.")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {
        "model_type": MODEL_TYPE,
        "config": model.cfg.to_dict(),
        "vocabulary": vocab.to_dict(),
        "dedup": tokenizer.dedup,
        "bert_config": model.features.body.config.to_dict(),
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    tokenizer.dictionary.save(tmp / DICT_NAME)
    if tokenizer.bpe is not None:
        tokenizer.bpe.base.save(tmp / BASE_DICT_NAME)
        (tmp / BPE_NAME).write_bytes(tokenizer.bpe.model_file.read_bytes())
    return replace_directory(tmp, target)


def load_unit_bert_ctc(
    directory: str | os.PathLike[str],
) -> tuple[UnitBertCtcModel, Vocabulary, UnitTokenizer]:
    """Read a :func:`save_unit_bert_ctc` directory: (model in eval mode, vocabulary, tokenizer).

    Raises:
        UserInputError: if the directory holds no unit-BERT CTC model.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    root = Path(directory)
    path = root / CONFIG_NAME
    if not path.exists():
        raise UserInputError(f"{path}: file does not exist (not a unit-BERT CTC model)")
    try:
        meta = read_json(path, "model config")
        cfg = UnitBertCtcConfig.from_dict(meta["config"])
        vocab = Vocabulary.from_dict(meta["vocabulary"])
        bert_cfg = dict(meta["bert_config"])
    except UserInputError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{path}: invalid unit-BERT CTC config: {err}") from None
    if meta.get("model_type") != MODEL_TYPE:
        raise UserInputError(f"{path}: model_type must be {MODEL_TYPE!r}, but is {meta.get('model_type')!r}")
    dictionary = UnitDictionary.load(root / DICT_NAME)
    bpe = (
        UnitBpe(root / BPE_NAME, UnitDictionary.load(root / BASE_DICT_NAME))
        if (root / BPE_NAME).is_file()
        else None
    )
    hf_config = AutoConfig.for_model(bert_cfg.pop("model_type"), **bert_cfg)
    model = build_unit_bert_ctc(cfg, AutoModelForMaskedLM.from_config(hf_config), dictionary)
    model.load_state_dict(load_file(str(root / WEIGHTS_NAME)))
    return model.eval(), vocab, UnitTokenizer(dictionary, bpe, dedup=bool(meta.get("dedup", False)))


@torch.no_grad()
def transcribe_units(directory: str | os.PathLike[str], units_dir: str | os.PathLike[str]) -> list[str]:
    """Greedy transcripts of every utterance of a units directory with a :func:`save_unit_bert_ctc` model."""
    model, vocab, tokenizer = load_unit_bert_ctc(directory)
    units = read_units(units_dir)
    out = []
    for i in range(len(units)):
        ids, repeats = tokenizer.encode(units.frames(i))
        if len(ids) == 0:
            out.append("")
            continue
        res = model(torch.from_numpy(ids)[None], torch.tensor([len(ids)]), torch.from_numpy(repeats)[None])
        out.extend(greedy_decode(res.log_probs, res.lengths, vocab))
    return out


# -- data ----------------------------------------------------------------------------------------------


@dataclass
class UnitCtcBatch:
    """A padded batch of tokenised utterances with their transcripts."""

    ids: Tensor
    """``[B, N]`` int64 token ids, padded with ``<pad>``."""
    lengths: Tensor
    """``[B]`` tokens per utterance."""
    repeats: Tensor
    """``[B, N]`` frames per token (0 past each length)."""
    indices: Tensor
    """``[B]`` dataset indices."""
    texts: list[str]
    """Per utterance, its label line."""

    def to(self, device: torch.device | str) -> UnitCtcBatch:
        return UnitCtcBatch(
            self.ids.to(device),
            self.lengths.to(device),
            self.repeats.to(device),
            self.indices.to(device),
            self.texts,
        )

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def frames(self) -> Tensor:
        """``[B]`` frames per utterance."""
        return self.repeats.sum(dim=1)


class UnitTranscriptDataset(torch.utils.data.Dataset):
    """The units of each manifest item paired with its label line (utterances without units are dropped).

    Args:
        manifest: the manifest (or dataset) whose labels are read.
        units_dir: its units, one line per item in the same order (``export-units``).
        tokenizer: units -> BERT tokens and repeats.
        labels: ``ltr``/``wrd`` (the label file beside the manifest).

    Raises:
        UserInputError: when the units and the manifest disagree (line count, utterance paths).
    """

    def __init__(
        self, manifest: str, units_dir: str | os.PathLike[str], tokenizer: UnitTokenizer, labels: str
    ) -> None:
        source = open_source(manifest, labels)
        units = read_units(units_dir)
        units_path = Path(units_dir)
        units_file = units_path if units_path.is_file() else units_path / UNITS_NAME
        if len(units) != len(source):
            raise UserInputError(
                f"{units_file}: has {len(units)} lines, but the manifest {manifest} has {len(source)} items "
                "(export the units of this manifest)"
            )
        _check_order(manifest, units_path, units.utterances if units.meta else None)
        self.items: list[tuple[np.ndarray, np.ndarray, str]] = []
        self.source_indices: list[int] = []
        self._skipped: dict[str, int] = {}
        for i in range(len(units)):
            ids, repeats = tokenizer.encode(units.frames(i))
            if len(ids) == 0:
                self._skipped["empty"] = self._skipped.get("empty", 0) + 1
                continue
            try:
                text = _text(source.text(i))
            except UnicodeDecodeError:
                self._skipped["bad_transcript"] = self._skipped.get("bad_transcript", 0) + 1
                continue
            self.items.append((ids, repeats, text))
            self.source_indices.append(i)
        if self._skipped:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self._skipped.items()))
            logger.warning(
                "%s: %d of %d utterance(s) skipped (empty: without units; bad_transcript: not UTF-8) (%s)",
                units_file, sum(self._skipped.values()), len(units), detail,
            )  # fmt: skip
        self.sizes = np.asarray([int(r.sum()) for _, r, _ in self.items], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        pass

    def bad_items(self) -> dict[str, int]:
        """Utterances left out, by reason (``empty``: no units; ``bad_transcript``: not UTF-8)."""
        return dict(self._skipped)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, repeats, text = self.items[index]
        return {
            "index": index,
            "ids": torch.from_numpy(ids),
            "repeats": torch.from_numpy(repeats),
            "text": text,
        }


def _check_order(manifest: str, units_dir: Path, utterances: list[str] | None) -> None:
    """With a ``.tsv`` manifest and an ``utts.txt``, every line must name the manifest's item."""
    if utterances is None or not (units_dir / UTTS_NAME).is_file() or not manifest.endswith((".tsv", ".txt")):
        return
    from speechvq.data.manifest import read_manifest

    for lineno, (item, utt) in enumerate(zip(read_manifest(manifest).items, utterances), start=1):
        if item.relpath != utt:
            raise UserInputError(
                f"{units_dir / UTTS_NAME}:{lineno}: names {utt!r}, but item {lineno} of {manifest} is "
                f"{item.relpath!r} (units of another manifest?)"
            )


def collate_unit_transcripts(items: list[dict[str, Any]], pad_id: int) -> UnitCtcBatch:
    """Pad dataset items into a :class:`UnitCtcBatch`."""
    lengths = torch.tensor([len(it["ids"]) for it in items], dtype=torch.long)
    width = int(lengths.max()) if items else 0
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    repeats = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["ids"])] = it["ids"]
        repeats[row, : len(it["repeats"])] = it["repeats"]
    indices = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return UnitCtcBatch(ids, lengths, repeats, indices, [it["text"] for it in items])


# -- task ----------------------------------------------------------------------------------------------


class UnitBertCtcTask(CtcTask):
    """CTC on unit-BERT features for :func:`speechvq.train.loop.train` (see the module docstring).

    The vocabulary (kept in ``exp_dir/vocab.json``), label encoding, training record and WER/CER
    validation record are :class:`~speechvq.train.finetune.CtcTask`'s; the model, data, loss and
    export are the unit-BERT ones.

    Args:
        cfg: the validated run config.
        init: the unit-BERT export (or ``pretrain-unit-bert`` experiment directory).
        exp_dir: the experiment directory.
        main: whether this process writes files.
    """

    name = "finetune-ctc-units"
    stat_names = ("loss", "targets", "tokens", "frames", "nonfinite")
    find_unused_parameters = True  # the frozen BERT leaves parameters without gradient

    def __init__(self, cfg: UnitCtcRunConfig, init: str, exp_dir: Path, *, main: bool = True) -> None:
        # CtcTask.__init__ loads a wav2vec 2.0 model; only its vocabulary and label helpers are reused
        root = find_unit_bert(init)
        if root is None:
            raise UserInputError(f"{init}: not a unit BERT export (no {UNIT_BERT_CONFIG_NAME})")
        self.cfg, self.init, self.main = cfg, str(root), main  # type: ignore[assignment]
        self.oov_seen: set[str] = set()
        self._oov_warned = False
        self.vocab = self._vocabulary(exp_dir / VOCAB_NAME, main)
        self._bert, dictionary, bpe = load_unit_bert(root)
        bert_cfg = _unit_bert_config(root)
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
        try:
            sampler = BucketBatchSampler(
                ds.sizes, d.max_tokens, num_replicas=num_replicas, rank=rank, seed=self.cfg.train.seed,
                shuffle=train,
            )  # fmt: skip
        except ValueError as err:
            raise UserInputError(f"{units}: {err} (raise data.max_tokens)") from None
        return (
            ds,
            sampler,
            functools.partial(collate_unit_transcripts, pad_id=self.tokenizer.dictionary.pad_id),
        )

    def _unit_targets(self, batch: UnitCtcBatch) -> tuple[Tensor, Tensor]:
        ids = [torch.tensor(self.encode(t), dtype=torch.long) for t in batch.texts]
        lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        padded = (
            nn.utils.rnn.pad_sequence(ids, batch_first=True) if ids else torch.zeros(0, 0, dtype=torch.long)
        )
        return padded.to(batch.ids.device), lengths.to(batch.ids.device)

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
        targets, target_lengths = self._unit_targets(batch)
        out = module(batch.ids, batch.lengths, batch.repeats)
        loss = model.compute_loss(out, targets, target_lengths)  # fp32, zero_infinity, summed
        value = float(loss.detach())
        stats = {
            "loss": value,
            "targets": float(len(batch)),  # sentence_avg: normalise per utterance
            "tokens": float(target_lengths.sum()),
            "frames": float(out.lengths.sum()),
            "nonfinite": 0.0 if math.isfinite(value) else 1.0,
        }
        return loss, stats

    def on_log(
        self, step: int, rec: dict[str, float], sums: dict[str, float], seconds: float, main: bool
    ) -> list[tuple[str, str]]:
        rec["frames_per_s"] = sums["frames"] / max(seconds, 1e-9)
        return []

    def eval_batch(self, model: nn.Module, batch: UnitCtcBatch) -> dict[str, float]:
        targets, target_lengths = self._unit_targets(batch)
        out = model(batch.ids, batch.lengths, batch.repeats)
        loss = float(model.compute_loss(out, targets, target_lengths))
        refs = [self.words(t) for t in batch.texts]
        hyps = greedy_decode(out.log_probs, out.lengths, self.vocab)
        we, ce = word_errors(refs, hyps), char_errors(refs, hyps)
        return {
            "loss": loss,
            "utterances": float(len(batch)),
            "word_errors": float(we.errors),
            "words": float(we.reference_length),
            "char_errors": float(ce.errors),
            "chars": float(ce.reference_length),
            "oov_refs": float(self.count_oov(batch.texts)),
        }

    def export(self, model: nn.Module, directory: Path) -> None:
        """The best model with its vocabulary and tokenizer (:func:`load_unit_bert_ctc` reads it)."""
        assert isinstance(model, UnitBertCtcModel)
        save_unit_bert_ctc(model, self.vocab, self.tokenizer, directory)


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
        init: the unit-BERT export (see :func:`find_unit_bert`).
        exp_dir: the experiment directory; ``exp_dir/best_model`` is exported at the end.
        require_resume: raise if there is no checkpoint to resume from.
        stop_at_step: stop (with a checkpoint) after this many updates, as if interrupted.
    """
    from speechvq.train.lock import experiment_lock
    from speechvq.train.loop import train

    main = int(os.environ.get("RANK", "0")) == 0
    with experiment_lock(exp_dir):  # the task writes vocab.json before the loop starts
        task = UnitBertCtcTask(cfg, init, Path(exp_dir), main=main)
        return train(task, cfg, exp_dir, require_resume=require_resume, stop_at_step=stop_at_step)
