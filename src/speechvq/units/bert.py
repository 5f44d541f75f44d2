"""BERT over discrete units (vq-wav2vec, Baevski et al. 2019, section 3.3 and 5.2).

A transformers ``BertForMaskedLM`` (or ``RobertaForMaskedLM``) is trained to predict masked spans
of a unit corpus: every token is a span start with probability ``mask_start_prob`` (0.05), each
span covers ``mask_span`` (10) tokens, spans may overlap, and each masked token is replaced by
``<mask>`` (80 %), a random unit (10 %) or kept (10 %), as in BERT. Masking runs in torch inside
:func:`masked_lm_objective` with the caller's generator, never in the collator.

:class:`~speechvq.units.bert_data.UnitCorpus` tokenises the unit corpora (dictionary, acoustic
BPE) and gives the datasets and the collator; :func:`save_unit_bert` writes the export that :func:`load_unit_bert` reads. The
training run is :class:`speechvq.train.tasks.unit_bert.UnitBertTask`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechvq.configio import from_dict
from speechvq.errors import UserInputError
from speechvq.files import read_json
from speechvq.units.dictionary import UnitBpe, UnitDictionary

if TYPE_CHECKING:
    from speechvq.units.bert_data import UnitBatch, UnitCorpus

logger = logging.getLogger(__name__)

CONFIG_NAME = "unit_bert.json"
DICT_NAME = "dict.txt"
BASE_DICT_NAME = "dict.units.txt"
BPE_NAME = "bpe.model"


@dataclass(kw_only=True)
class UnitBertConfig:
    """A unit BERT: architecture, masking and data settings. Defaults: vq-wav2vec's BERT base."""

    # Architecture
    arch: Literal["bert", "roberta"] = "bert"
    """transformers class: ``BertForMaskedLM`` or ``RobertaForMaskedLM``."""
    dim: int = 768
    """Hidden size (transformers ``hidden_size``)."""
    num_layers: int = 12
    """Transformer blocks (``num_hidden_layers``)."""
    num_heads: int = 12
    """Attention heads (``num_attention_heads``); must divide ``dim``."""
    ffn_dim: int = 3072
    """Feed-forward size (``intermediate_size``)."""
    dropout_p: float = 0.1
    """``hidden_dropout_prob``."""
    attention_dropout_p: float = 0.1
    """``attention_probs_dropout_prob``."""
    max_positions: int = 512
    """Longest token sequence, ``<s>``/``</s>`` included (fairseq ``tokens_per_sample``)."""

    # Masking
    mask_start_prob: float = 0.05
    """Probability that a token starts a masked span (vq-wav2vec p = 0.05)."""
    mask_span: int = 10
    """Tokens per masked span (vq-wav2vec M = 10); spans may overlap."""
    mask_replace_prob: float = 0.8
    """Share of masked tokens replaced by ``<mask>``."""
    random_replace_prob: float = 0.1
    """Share of masked tokens replaced by a random unit (the rest keep their token)."""

    # Data
    bpe_vocab_size: int = 0
    """Acoustic BPE pieces learned over the unit strings with sentencepiece (0: no BPE)."""
    dedup: bool = False
    """Collapse runs of repeated units before tokenising (vq-wav2vec trains on the raw frames)."""

    def __post_init__(self) -> None:
        if self.arch not in ("bert", "roberta"):
            raise ValueError(f"`arch` must be 'bert' or 'roberta', but is {self.arch!r} instead.")
        if self.dim % self.num_heads:
            raise ValueError(
                f"`dim` must be a multiple of `num_heads` ({self.num_heads}), but is {self.dim} instead."
            )
        if not 0.0 < self.mask_start_prob <= 1.0:
            raise ValueError(f"`mask_start_prob` must be in (0, 1], but is {self.mask_start_prob} instead.")
        if self.mask_span < 1:
            raise ValueError(f"`mask_span` must be >= 1, but is {self.mask_span} instead.")
        if (
            self.mask_replace_prob < 0
            or self.random_replace_prob < 0
            or (self.mask_replace_prob + self.random_replace_prob > 1.0)
        ):
            raise ValueError(
                "`mask_replace_prob` + `random_replace_prob` must be in [0, 1], but is "
                f"{self.mask_replace_prob} + {self.random_replace_prob} instead."
            )
        if self.max_positions < 3:
            raise ValueError(f"`max_positions` must be >= 3, but is {self.max_positions} instead.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitBertConfig:
        """Inverse of :meth:`to_dict` (:func:`speechvq.configio.from_dict`): unknown keys, wrong
        types and bad values raise :class:`UserInputError` naming them."""
        return from_dict(cls, data)


def load_unit_bert_config(path: str | os.PathLike[str]) -> UnitBertConfig:
    """Read a ``conf/unit_bert_*.yaml`` file (a flat mapping of :class:`UnitBertConfig` fields)."""
    import yaml

    from speechvq.files import read_text

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: config file does not exist")
    text = read_text(path, "config file")
    try:
        data = yaml.safe_load(text) or {}
        return UnitBertConfig.from_dict(data.get("model", data))
    except (ValueError, AttributeError, yaml.YAMLError) as err:  # UserInputError is a ValueError
        raise UserInputError(f"{path}: invalid unit BERT config: {err}") from None


def build_unit_bert(cfg: UnitBertConfig, dictionary: UnitDictionary) -> nn.Module:
    """A randomly initialised transformers masked LM over ``dictionary``."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    common: dict[str, Any] = dict(
        vocab_size=len(dictionary),
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_dropout_prob=cfg.dropout_p,
        attention_probs_dropout_prob=cfg.attention_dropout_p,
        type_vocab_size=1,
        pad_token_id=dictionary.pad_id,
        bos_token_id=dictionary.bos_id,
        eos_token_id=dictionary.eos_id,
    )
    if cfg.arch == "roberta":
        # RoBERTa numbers positions from pad_id + 1, so it needs pad_id + 1 extra rows
        hf_cfg = RobertaConfig(max_position_embeddings=cfg.max_positions + dictionary.pad_id + 1, **common)
        return RobertaForMaskedLM(hf_cfg)
    return BertForMaskedLM(BertConfig(max_position_embeddings=cfg.max_positions, **common))


class UnitMaskedLM(nn.Module):
    """A transformers masked LM (``.hf``) whose forward scores only the positions it is asked for.

    transformers' ``BertForMaskedLM`` / ``RobertaForMaskedLM`` apply the MLM head to every
    position, padding included, although the loss reads only the masked ones (~40% of the tokens
    with vq-wav2vec's spans). The head over the unit vocabulary is the largest matmul of a small
    BERT, so scoring only the masked positions, as fairseq's ``masked_lm`` does, saves most of it.
    The scores are those of ``hf(...).logits`` at the same positions; ``.hf`` is what is exported.
    """

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def head(self) -> nn.Module:
        """The MLM head: ``cls`` (BERT) or ``lm_head`` (RoBERTa)."""
        return self.hf.cls if hasattr(self.hf, "cls") else self.hf.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, predict: Tensor) -> Tensor:
        """input_ids, attention_mask, predict: ``[B, N]`` -> ``[M, V]`` scores of the M ``predict`` positions."""
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head()(hidden[predict])  # (B, N, D) -> (M, D) -> (M, V)


def compute_unit_span_mask(
    lengths: Tensor,
    max_len: int,
    *,
    start_prob: float,
    span: int,
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """vq-wav2vec's span mask: each token starts a ``span``-token span with probability ``start_prob``.

    Spans may overlap and are cut at the end of the content; the expected masked share of a long
    sequence is ``1 - (1 - start_prob) ** span``.

    Args:
        lengths: ``[B]`` content tokens per sequence.
        max_len: N, the padded length.
        start_prob: span start probability.
        span: tokens per span.
        offset: content starts at this position (1 after a ``<s>``).
        generator: RNG.

    Returns:
        ``[B, N]`` bool, True at masked content tokens.
    """
    batch = lengths.size(0)
    pos = torch.arange(max_len, device=lengths.device)[None, :]
    content = (pos >= offset) & (pos < offset + lengths[:, None])  # (B, N)
    draws = torch.rand(batch, max_len, generator=generator, device="cpu").to(lengths.device)
    starts = (draws < start_prob) & content
    # position t is masked iff a span starts in (t - span, t]: a windowed count via cumsum
    count = starts.long().cumsum(dim=1)
    shifted = F.pad(count, (span, 0))[:, :max_len]  # count up to t - span
    return ((count - shifted) > 0) & content


def bert_replace(
    ids: Tensor,
    mask: Tensor,
    *,
    mask_id: int,
    random_low: int,
    random_high: int,
    mask_replace_prob: float,
    random_replace_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's replacement of the masked tokens (Devlin et al. 2019, section 3.1).

    Args:
        ids: ``[B, N]`` token ids.
        mask: ``[B, N]`` bool, the tokens to predict.
        mask_id: the ``<mask>`` id.
        random_low, random_high: random replacements are drawn from ``[random_low, random_high)``.
        mask_replace_prob: share replaced by ``<mask>``.
        random_replace_prob: share replaced by a random token (the rest stay).
        generator: RNG.

    Returns:
        (inputs ``[B, N]``, targets ``[B, N]``: the original id at masked tokens, -100 elsewhere).
    """
    u = torch.rand(ids.shape, generator=generator).to(ids.device)
    random_ids = torch.randint(random_low, random_high, ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(mask & (u < mask_replace_prob), torch.full_like(ids, mask_id), ids)
    use_random = mask & (u >= mask_replace_prob) & (u < mask_replace_prob + random_replace_prob)
    inputs = torch.where(use_random, random_ids, inputs)
    targets = torch.where(mask, ids, torch.full_like(ids, -100))
    return inputs, targets


def masked_lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, int, int]:
    """Cross-entropy summed over the targets (fp32), their count, and how many were top-1 correct.

    Args:
        logits: ``[B, N, V]``, or ``[M, V]`` scores of the predicted positions only.
        targets: ``[B, N]`` (-100 where nothing is predicted), or ``[M]``.
    """
    if logits.dim() == 2:  # already the predicted positions: no (M, V) copy
        scores, wanted = logits.float(), targets
    else:
        keep = targets != -100
        scores, wanted = logits[keep].float(), targets[keep]  # (B, N, V) -> (M, V)
    if wanted.numel() == 0:
        return logits.sum() * 0.0, 0, 0
    loss = F.cross_entropy(scores, wanted, reduction="sum")
    correct = int((scores.argmax(-1) == wanted).sum())
    return loss, int(wanted.numel()), correct


@dataclass
class MaskedLmResult:
    """What :func:`masked_lm_objective` returns for one batch."""

    loss: Tensor
    """Cross-entropy summed over the masked tokens (fp32)."""
    num_targets: int
    """M, masked tokens."""
    correct: int
    """Masked tokens predicted right (top 1)."""
    targets: Tensor
    """``[M]`` the original ids of the masked tokens."""


def masked_lm_objective(
    model: nn.Module,
    batch: UnitBatch,
    cfg: UnitBertConfig,
    dictionary: UnitDictionary,
    generator: torch.Generator | None = None,
) -> MaskedLmResult:
    """Mask spans of ``batch`` (vq-wav2vec), replace them BERT-style, and score the predictions.

    Args:
        model: a :class:`UnitMaskedLM` (or its DDP wrapper).
        batch: the padded token sequences (``<s> ... </s>``).
        cfg: the masking settings.
        dictionary: for the special ids and the range of random replacements.
        generator: RNG of the masks and replacements.
    """
    ids = batch.ids
    mask = compute_unit_span_mask(
        batch.lengths - 2, ids.size(1), start_prob=cfg.mask_start_prob, span=cfg.mask_span, offset=1,
        generator=generator,
    )  # fmt: skip
    inputs, targets = bert_replace(
        ids,
        mask,
        mask_id=dictionary.mask_id,
        random_low=dictionary.first_unit_id,
        random_high=dictionary.mask_id,
        mask_replace_prob=cfg.mask_replace_prob,
        random_replace_prob=cfg.random_replace_prob,
        generator=generator,
    )
    attention = (torch.arange(ids.size(1), device=ids.device)[None, :] < batch.lengths[:, None]).long()
    predict = targets != -100
    wanted = targets[predict]
    loss, n, correct = masked_lm_loss(model(inputs, attention, predict), wanted)
    return MaskedLmResult(loss=loss, num_targets=n, correct=correct, targets=wanted)


def save_unit_bert(model: UnitMaskedLM, corpus: UnitCorpus, directory: str | os.PathLike[str]) -> None:
    """transformers ``save_pretrained`` of ``model.hf`` + ``dict.txt`` (+ BPE files) + ``unit_bert.json``
    (:func:`load_unit_bert` reads it back)."""
    from speechvq.files import check_output_dir
    from speechvq.interop.hf import quiet_transformers
    from speechvq.io import write_directory

    def fill(out: Path) -> None:
        model.hf.save_pretrained(out)  # type: ignore[operator]
        corpus.dictionary.save(out / DICT_NAME)
        if corpus.bpe is not None:
            corpus.base_dictionary.save(out / BASE_DICT_NAME)
            (out / BPE_NAME).write_bytes(corpus.bpe.model_file.read_bytes())
        (out / CONFIG_NAME).write_text(json.dumps({"config": corpus.cfg.to_dict()}, indent=2) + "\n")

    with quiet_transformers():
        write_directory(check_output_dir(directory, "the unit BERT export"), fill)


def load_unit_bert(directory: str | os.PathLike[str]) -> tuple[nn.Module, UnitDictionary, UnitBpe | None]:
    """A :func:`save_unit_bert` directory -> (masked LM, dictionary, BPE or None)."""
    from transformers import AutoModelForMaskedLM

    root = Path(directory)
    if not (root / DICT_NAME).is_file():
        raise UserInputError(f"{root}: not a unit BERT export (no {DICT_NAME})")
    from speechvq.interop.hf import quiet_transformers

    try:
        with quiet_transformers():
            model = AutoModelForMaskedLM.from_pretrained(root)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserInputError(
            f"{root}: not a readable unit BERT export ({type(err).__name__}: {reason})"
        ) from None
    dictionary = UnitDictionary.load(root / DICT_NAME)
    bpe = (
        UnitBpe(root / BPE_NAME, UnitDictionary.load(root / BASE_DICT_NAME))
        if (root / BPE_NAME).is_file()
        else None
    )
    return model.eval(), dictionary, bpe


def read_unit_bert_config(root: Path) -> UnitBertConfig:
    """The :class:`UnitBertConfig` of a unit-BERT export (its ``unit_bert.json``)."""
    path = root / CONFIG_NAME
    if not path.exists():
        raise UserInputError(f"{path}: file does not exist (not a unit BERT export)")
    meta = read_json(path, "unit BERT config")
    try:
        return UnitBertConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as err:  # UserInputError is a ValueError
        raise UserInputError(f"{path}: invalid unit BERT config: {err}") from None


def find_unit_bert(spec: str | os.PathLike[str]) -> Path | None:
    """The unit-BERT export named by ``--init``, or None if ``spec`` is something else.

    Accepts an export (a directory with ``unit_bert.json``, written by ``pretrain-unit-bert``) or
    a ``pretrain-unit-bert`` experiment directory (its ``best_model``).
    """
    path = Path(spec)
    for candidate in (path, path / "best_model"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None
