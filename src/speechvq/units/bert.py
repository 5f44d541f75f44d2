"""BERT over discrete units (vq-wav2vec, Baevski et al. 2019, section 3.3 and 5.2).

A transformers ``BertForMaskedLM`` (or ``RobertaForMaskedLM``) is trained to predict masked spans
of a unit corpus: every token is a span start with probability ``mask_start_prob`` (0.05), each
span covers ``mask_span`` (10) tokens, spans may overlap, and each masked token is replaced by
``<mask>`` (80 %), a random unit (10 %) or kept (10 %), as in BERT. Masking runs in torch inside
:meth:`UnitBertTask.loss` with the caller's generator, never in the collator.

:class:`UnitBertTask` is what a training loop needs: the model, the datasets, a collator, per-item
token counts for length-bucketed batching, the loss (a sum over targets, with the target count)
and the export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechvq.errors import UserInputError
from speechvq.units.dictionary import UnitBpe, UnitDictionary
from speechvq.units.io import read_units

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
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown field(s) {unknown} for UnitBertConfig; known: {sorted(known)}")
        return cls(**data)


def load_unit_bert_config(path: str | os.PathLike[str]) -> UnitBertConfig:
    """Read a ``conf/unit_bert_*.yaml`` file (a flat mapping of :class:`UnitBertConfig` fields)."""
    import yaml

    from speechvq.files import read_text

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(read_text(path, "config file")) or {}
        return UnitBertConfig.from_dict(data.get("model", data))
    except UserInputError:
        raise
    except (TypeError, ValueError, AttributeError, yaml.YAMLError) as err:
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
class UnitBatch:
    """A padded batch of token sequences (``<s> ... </s>``)."""

    ids: Tensor
    """``[B, N]`` int64, padded with ``<pad>``."""
    lengths: Tensor
    """``[B]`` tokens per sequence, ``<s>`` and ``</s>`` included."""
    indices: Tensor
    """``[B]`` dataset indices."""

    def to(self, device: torch.device | str) -> UnitBatch:
        return UnitBatch(self.ids.to(device), self.lengths.to(device), self.indices.to(device))

    def __len__(self) -> int:
        return int(self.lengths.numel())


class UnitDataset(torch.utils.data.Dataset):
    """Tokenised utterances, cropped to ``max_len`` tokens (``<s>``/``</s>`` included).

    Args:
        sequences: per utterance, its ``[N]`` content ids (no ``<s>``/``</s>``).
        dictionary: for the special ids.
        max_len: longest item; longer ones are cropped at a random offset (``random_crop``,
            determined by (seed, epoch, index)) or from the start.
    """

    def __init__(
        self,
        sequences: list[np.ndarray],
        dictionary: UnitDictionary,
        max_len: int,
        *,
        random_crop: bool = True,
        seed: int = 0,
    ) -> None:
        keep = [i for i, s in enumerate(sequences) if len(s) > 0]
        self.sequences = [sequences[i] for i in keep]
        self.dictionary = dictionary
        self.max_len = max_len
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.sizes = np.asarray([min(len(s), max_len - 2) + 2 for s in self.sequences], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        seq = self.sequences[index]
        room = self.max_len - 2
        start = 0
        if len(seq) > room and self.random_crop:
            start = int(
                np.random.default_rng([self.seed, self.epoch, index]).integers(0, len(seq) - room + 1)
            )
        body = seq[start : start + room]
        d = self.dictionary
        ids = np.concatenate([[d.bos_id], body, [d.eos_id]]).astype(np.int64)
        return {"index": index, "ids": torch.from_numpy(ids)}


def collate_units(items: list[dict[str, Any]], pad_id: int) -> UnitBatch:
    """Pad dataset items into a :class:`UnitBatch`."""
    lengths = torch.tensor([len(it["ids"]) for it in items], dtype=torch.long)
    ids = torch.full((len(items), int(lengths.max()) if items else 0), pad_id, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["ids"])] = it["ids"]
    return UnitBatch(ids=ids, lengths=lengths, indices=torch.tensor([int(it["index"]) for it in items]))


class UnitBertTask:
    """Masked-LM pretraining of a unit BERT: everything a training loop needs.

    The dictionary (and, with ``cfg.bpe_vocab_size``, the BPE model) is read from ``work_dir`` if
    it is there, else built from the training units and written there.

    Args:
        cfg: the model, masking and data settings.
        units_dir: the training units (an ``export-units`` directory).
        valid_units_dir: optional validation units.
        work_dir: where ``dict.txt`` (and ``bpe.model``) live.
        seed: crop seed.
    """

    def __init__(
        self,
        cfg: UnitBertConfig,
        units_dir: str | os.PathLike[str],
        valid_units_dir: str | os.PathLike[str] | None = None,
        *,
        work_dir: str | os.PathLike[str],
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        train_units = self._unit_strings(units_dir)
        self.base_dictionary, self.bpe, self.dictionary = self._vocab(train_units)
        self._train = self._encode(train_units)
        self._valid = self._encode(self._unit_strings(valid_units_dir)) if valid_units_dir else None
        self.unigram_logp, self.majority_id = unigram_baseline(self._train, self.dictionary)

    def _unit_strings(self, directory: str | os.PathLike[str]) -> list[list[str]]:
        units = read_units(directory)
        if self.cfg.dedup:
            return [[str(t) for t in _dedup(units.frames(i))] for i in range(len(units))]
        return [units.frames(i) for i in range(len(units))]

    def _vocab(self, corpus: list[list[str]]) -> tuple[UnitDictionary, UnitBpe | None, UnitDictionary]:
        if self.cfg.bpe_vocab_size <= 0:
            path = self.work_dir / DICT_NAME
            d = UnitDictionary.load(path) if path.is_file() else UnitDictionary.build(corpus)
            d.save(path)
            return d, None, d
        base_path, bpe_path = self.work_dir / BASE_DICT_NAME, self.work_dir / BPE_NAME
        base = UnitDictionary.load(base_path) if base_path.is_file() else UnitDictionary.build(corpus)
        base.save(base_path)
        if bpe_path.is_file():
            bpe = UnitBpe(bpe_path, base)
        else:
            bpe = UnitBpe.train(corpus, base, self.cfg.bpe_vocab_size, self.work_dir / "bpe")
        path = self.work_dir / DICT_NAME
        d = (
            UnitDictionary.load(path)
            if path.is_file()
            else UnitDictionary.build(bpe.encode(u) for u in corpus)
        )
        d.save(path)
        return base, bpe, d

    def tokenize(self, units: list[str]) -> list[str]:
        """The BERT tokens of a unit sequence (its BPE pieces, or the units themselves)."""
        return self.bpe.encode(units) if self.bpe is not None else list(units)

    def _encode(self, corpus: list[list[str]]) -> list[np.ndarray]:
        return [self.dictionary.encode(self.tokenize(u), add_specials=False).astype(np.int32) for u in corpus]

    def build_model(self) -> UnitMaskedLM:
        return UnitMaskedLM(build_unit_bert(self.cfg, self.dictionary))

    def train_dataset(self) -> UnitDataset:
        return UnitDataset(
            self._train, self.dictionary, self.cfg.max_positions, random_crop=True, seed=self.seed
        )

    def valid_dataset(self) -> UnitDataset | None:
        if self._valid is None:
            return None
        return UnitDataset(self._valid, self.dictionary, self.cfg.max_positions, random_crop=False)

    def collate(self, items: list[dict[str, Any]]) -> UnitBatch:
        return collate_units(items, self.dictionary.pad_id)

    def batch_sizes(self) -> np.ndarray:
        """``[N]`` tokens per training item, for :class:`~speechvq.data.BucketBatchSampler`."""
        return self.train_dataset().sizes

    def loss(
        self, model: nn.Module, batch: UnitBatch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, int, dict[str, float]]:
        """Mask spans, replace BERT-style, predict: (summed cross-entropy, targets, metrics)."""
        d, cfg = self.dictionary, self.cfg
        ids = batch.ids
        mask = compute_unit_span_mask(
            batch.lengths - 2, ids.size(1), start_prob=cfg.mask_start_prob, span=cfg.mask_span, offset=1,
            generator=generator,
        )  # fmt: skip
        inputs, targets = bert_replace(
            ids,
            mask,
            mask_id=d.mask_id,
            random_low=d.first_unit_id,
            random_high=d.mask_id,
            mask_replace_prob=cfg.mask_replace_prob,
            random_replace_prob=cfg.random_replace_prob,
            generator=generator,
        )
        attention = (torch.arange(ids.size(1), device=ids.device)[None, :] < batch.lengths[:, None]).long()
        predict = targets != -100
        wanted = targets[predict]
        loss, n, correct = masked_lm_loss(model(inputs, attention, predict), wanted)
        content = int((batch.lengths - 2).sum())
        # the baselines on the same targets: the training units' unigram distribution, and the
        # most frequent training unit
        unigram = -self.unigram_logp.to(wanted.device)[wanted].sum()
        metrics = {
            "accuracy": correct / max(n, 1),
            "masked_share": n / max(content, 1),
            "tokens": float(content),
            "unigram_ce": float(unigram),
            "majority_correct": float((wanted == self.majority_id).sum()),
        }
        return loss, n, metrics

    def save_export(self, model: UnitMaskedLM, directory: str | os.PathLike[str]) -> None:
        """transformers ``save_pretrained`` of ``model.hf`` + ``dict.txt`` (+ BPE files) + ``unit_bert.json``."""
        from speechvq.files import check_output_dir
        from speechvq.interop.hf import quiet_transformers
        from speechvq.io import write_directory

        def fill(out: Path) -> None:
            model.hf.save_pretrained(out)  # type: ignore[operator]
            self.dictionary.save(out / DICT_NAME)
            if self.bpe is not None:
                self.base_dictionary.save(out / BASE_DICT_NAME)
                (out / BPE_NAME).write_bytes(self.bpe.model_file.read_bytes())
            (out / CONFIG_NAME).write_text(json.dumps({"config": self.cfg.to_dict()}, indent=2) + "\n")

        with quiet_transformers():
            write_directory(check_output_dir(directory, "the unit BERT export"), fill)


def unigram_baseline(sequences: list[np.ndarray], dictionary: UnitDictionary) -> tuple[Tensor, int]:
    """The two baselines a unit BERT must beat, from the training token sequences: ``[V]``
    log-probabilities of the add-one-smoothed unigram distribution over the units (specials get
    none), and the id of the most frequent unit.

    A model that learns only how often each unit occurs reaches the unigram cross-entropy on the
    masked tokens, and one that always predicts the commonest unit reaches its share as accuracy;
    an MLM loss above the first or an accuracy below the second means the BERT has not used the
    context at all.
    """
    counts = np.zeros(len(dictionary), dtype=np.float64)
    for seq in sequences:
        counts += np.bincount(np.asarray(seq, dtype=np.int64), minlength=len(dictionary))
    units = np.zeros(len(dictionary), dtype=bool)
    units[dictionary.first_unit_id : dictionary.mask_id] = True
    counts = np.where(units, counts + 1.0, 0.0)
    with np.errstate(divide="ignore"):
        logp = np.log(counts / counts.sum())
    majority = int(np.argmax(np.where(units, counts, -1.0)))
    return torch.from_numpy(logp), majority


def _dedup(tokens: list[str]) -> list[str]:
    return [t for i, t in enumerate(tokens) if i == 0 or tokens[i - 1] != t]


def load_unit_bert(directory: str | os.PathLike[str]) -> tuple[nn.Module, UnitDictionary, UnitBpe | None]:
    """A :meth:`UnitBertTask.save_export` directory -> (masked LM, dictionary, BPE or None)."""
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
