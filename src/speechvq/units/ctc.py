"""BERT features for speech recognition: units -> unit-BERT layer -> acoustic head -> CTC (vq-wav2vec 5.2).

vq-wav2vec (Baevski et al. 2019, section 5.2) trains an acoustic model on the hidden states of a
BERT that was pretrained on the discrete units of the audio, instead of on log-mel features. Here
the same recipe runs on speechvq's parts:

1. the units of each utterance are tokenised as the unit BERT was trained
   (:mod:`speechvq.units.ctc_data`), each token keeping the number of frames it stands for;
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

Training is :class:`~speechvq.train.tasks.unit_ctc.UnitBertCtcTask`; ``speechvq finetune-ctc``
runs it when ``--init`` is a unit BERT (see :mod:`speechvq.commands.finetune_ctc`). The export
(:func:`save_unit_bert_ctc`) is read back by :func:`load_unit_bert_ctc`, and
:func:`transcribe_units` decodes a units directory with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speechvq.configio import from_dict
from speechvq.decoding import greedy_decode
from speechvq.errors import UserInputError
from speechvq.files import read_json
from speechvq.io import replace_directory
from speechvq.losses_ctc import ctc_loss
from speechvq.models import kernels
from speechvq.models.common import Conv1d, Linear
from speechvq.text.vocab import Vocabulary
from speechvq.units.bert import BASE_DICT_NAME, BPE_NAME, DICT_NAME
from speechvq.units.ctc_data import UnitTokenizer
from speechvq.units.dictionary import UnitBpe, UnitDictionary
from speechvq.units.features import LayerMix, UnitBertFeatures
from speechvq.units.io import read_units

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
    mix_layers: bool = False
    """Features are a learned weighted sum of the embeddings and every block up to ``layer``
    (:class:`~speechvq.units.features.LayerMix`), not ``layer`` alone."""
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
        """Inverse of :meth:`to_dict` (:func:`speechvq.configio.from_dict`)."""
        return from_dict(cls, data)


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

    def __init__(
        self,
        features: UnitBertFeatures,
        head: AcousticHead,
        cfg: UnitBertCtcConfig,
        mix: LayerMix | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = features
        self.mix = mix
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
        if self.mix is not None:
            feats = self.mix(feats)
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
    features = UnitBertFeatures(
        masked_lm, dictionary, layer=cfg.layer, max_positions=cfg.max_positions, all_layers=cfg.mix_layers
    )
    blocks: nn.Module | None = None
    if cfg.head_layers > 0 and cfg.head == "conv":
        blocks = nn.ModuleList(
            ConvBlock(cfg.head_dim, cfg.head_kernel, cfg.dropout_p) for _ in range(cfg.head_layers)
        )
    elif cfg.head_layers > 0:
        blocks = TransformerBlocks(
            cfg.head_dim, cfg.head_layers, cfg.head_heads, cfg.head_ffn_dim, cfg.head_kernel, cfg.dropout_p
        )
    mix = LayerMix(features.layer + 1) if cfg.mix_layers else None
    model = UnitBertCtcModel(features, AcousticHead(features.dim, blocks, cfg), cfg, mix)
    return kernels.select_(model, fast=True)  # the head's linears on the CPU's faster fp32 matmul


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
    meta = read_json(path, "model config")
    try:
        cfg = UnitBertCtcConfig.from_dict(meta["config"])
        vocab = Vocabulary.from_dict(meta["vocabulary"])
        bert_cfg = dict(meta["bert_config"])
    except (ValueError, KeyError, TypeError) as err:  # UserInputError is a ValueError
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
