"""wav2vec 2.0 with a CTC head for speech recognition (paper section 4.3; fairseq ``wav2vec_ctc``).

The pretrained feature encoder, feature projection and context network are reused unchanged;
fine-tuning adds a dropout and a Linear output layer over the vocabulary, and SpecAugment-style
time and channel masking of the context network's input during training.

Freezing follows fairseq: the feature encoder is never trained (``encoder.grad_mult = 0`` runs it
without autograd), and for the first ``freeze_updates`` updates everything except the output layer
runs without autograd, so only ``lm_head`` receives gradients. The update count lives in the
``num_updates`` buffer (set it with :meth:`CtcModel.set_num_updates_` before each step), so a
resumed run freezes exactly as the original did. Parameters without a gradient are skipped by
torch optimizers; under DDP, pass ``find_unused_parameters=True`` while frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechvq.config import (
    MAX_PARAMETERS,
    MAX_SIZE,
    TRANSFORMERS_NORMALIZE_EPS,
    ContextConfig,
    FeatureEncoderConfig,
    MaskConfig,
    Wav2Vec2Config,
    WaveformNorm,
    approx_parameters,
    finetune_mask,
    to_plain,
)
from speechvq.configio import from_dict
from speechvq.losses_ctc import ctc_loss
from speechvq.models import kernels
from speechvq.models.common import Linear, lengths_to_padding_mask, padding_mask_or_none
from speechvq.models.context import ContextNetwork, build_context_network
from speechvq.models.encoder import ConvFeatureEncoder, build_feature_encoder
from speechvq.models.masking import compute_span_mask
from speechvq.models.protocol import FeatureEncoderGeometry, Layer, check_layer
from speechvq.models.wav2vec2 import FeatureProjection, Wav2Vec2Model, transformer_layer

NORMALIZE_EPS = TRANSFORMERS_NORMALIZE_EPS
"""eps of the normalisation inside :meth:`CtcModel.forward`: transformers' feature extractor's, so
that an exported model's outputs stay identical."""


@dataclass(kw_only=True)
class CtcConfig:
    """wav2vec 2.0 + CTC. The defaults are fairseq's BASE 10 min / 1 h fine-tuning settings."""

    encoder: FeatureEncoderConfig = field(default_factory=lambda: FeatureEncoderConfig(grad_mult=0.0))
    """The pretrained feature encoder; ``grad_mult = 0`` keeps it frozen (fairseq ``feature_grad_mult``)."""

    context: ContextConfig = field(
        default_factory=lambda: ContextConfig(
            dropout_p=0.0, attention_dropout_p=0.0, activation_dropout_p=0.1, layer_drop_p=0.1
        )
    )
    """The pretrained Transformer; its dropouts and LayerDrop are fine-tuning settings."""

    mask: MaskConfig = field(default_factory=finetune_mask)
    """Time masking (``mask_prob``, ``mask_length``, ``min_masks``; fairseq ``mask_prob``) and
    channel masking (``channel_prob``, ``channel_length``; fairseq ``mask_channel_*``), in
    training only. ``mask_prob = 0`` / ``channel_prob = 0`` disable them."""

    vocab_size: int = 32
    """V, output units including the blank."""

    blank_id: int = 0
    """Index of the CTC blank (transformers' ``pad_token_id``; ``<pad>`` is the blank there)."""

    feature_dropout_p: float = 0.0
    """Dropout on the projected features (fairseq ``dropout_input``)."""

    final_dropout_p: float = 0.0
    """Dropout before the output layer (fairseq ``final_dropout``, transformers ``final_dropout``)."""

    freeze_updates: int = 10000
    """Updates during which only the output layer trains (fairseq ``freeze_finetune_updates``)."""

    normalize_waveform: bool = False
    """Normalise each waveform to zero mean and unit variance over its valid samples inside
    :meth:`CtcModel.forward` (fairseq ``task.normalize``, transformers ``do_normalize``). Must match
    pretraining: False for BASE, True for LARGE."""

    @property
    def waveform_norm(self) -> WaveformNorm:
        """Input normalisation: ``normalize_waveform``, applied inside the forward with
        transformers' eps (1e-7), so callers pass raw waveforms."""
        return WaveformNorm(enabled=self.normalize_waveform, eps=NORMALIZE_EPS, in_forward=True)

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(
                f"`vocab_size` must be >= 2 (blank + one unit), but is {self.vocab_size} instead."
            )
        if not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(
                f"`blank_id` must be in [0, vocab_size={self.vocab_size}), but is {self.blank_id} instead."
            )
        if self.freeze_updates < 0:
            raise ValueError(f"`freeze_updates` must be >= 0, but is {self.freeze_updates} instead.")
        if self.vocab_size > MAX_SIZE:
            raise ValueError(f"`vocab_size` must be at most {MAX_SIZE}, but is {self.vocab_size} instead.")
        total = approx_parameters(self.encoder, self.context)
        if total > MAX_PARAMETERS:
            raise ValueError(
                f"the model must have at most {MAX_PARAMETERS:.0e} parameters, but this config describes "
                f"about {total:.2e} instead."
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict (tuples become lists)."""
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CtcConfig:
        """Inverse of :meth:`to_dict` (:func:`speechvq.configio.from_dict`)."""
        return from_dict(cls, data)


# Fine-tuning settings that ctc_config_from_wav2vec2 accepts for the context network.
_CONTEXT_SETTINGS = ("dropout_p", "attention_dropout_p", "activation_dropout_p", "layer_drop_p")


def ctc_config_from_wav2vec2(w2v_cfg: Wav2Vec2Config, vocab_size: int, **settings: Any) -> CtcConfig:
    """A :class:`CtcConfig` with the architecture of a pretraining config.

    Args:
        w2v_cfg: the pretrained model's config (feature encoder and context architecture).
        vocab_size: V.
        **settings: :class:`CtcConfig` fields (``mask``, ``final_dropout_p``, ``freeze_updates``,
            ``normalize_waveform``, ...; ``mask`` may be a dict of the fields that differ from
            :class:`CtcConfig`'s default mask) and the context network's
            ``dropout_p``, ``attention_dropout_p``, ``activation_dropout_p``, ``layer_drop_p``.
            Unset ones take the :class:`CtcConfig` defaults (fairseq fine-tuning values).

    Raises:
        TypeError: for an unknown setting.
    """
    defaults = CtcConfig()
    context_kwargs = {k: settings.pop(k) for k in _CONTEXT_SETTINGS if k in settings}
    context_defaults = {k: getattr(defaults.context, k) for k in _CONTEXT_SETTINGS}
    known = {f.name for f in dataclasses.fields(CtcConfig)} - {"encoder", "context", "vocab_size"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown fine-tuning setting(s) {unknown}")
    if isinstance(settings.get("mask"), dict):  # a partial mask dict updates the fine-tuning defaults
        settings["mask"] = dataclasses.replace(finetune_mask(), **settings["mask"])
    context = dataclasses.replace(w2v_cfg.context, **{**context_defaults, **context_kwargs})
    encoder = dataclasses.replace(w2v_cfg.encoder, grad_mult=0.0)
    return CtcConfig(encoder=encoder, context=context, vocab_size=vocab_size, **settings)


@dataclass
class CtcOutput:
    """Output of :meth:`CtcModel.forward`."""

    logits: Tensor
    """``[B, T, V]`` unnormalised scores per frame (in the model's dtype)."""
    lengths: Tensor
    """``[B]`` valid frames per utterance."""
    time_mask: Tensor | None
    """``[B, T]`` bool, frames replaced by the mask embedding (None when no time masking ran)."""


def normalize_waveforms(waveforms: Tensor, lengths: Tensor | None, eps: float = NORMALIZE_EPS) -> Tensor:
    """Zero mean, unit variance per utterance over its valid samples; padding stays 0.

    Computes ``(x - mean) / sqrt(var + eps)`` with the population variance, as transformers'
    ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does.

    Args:
        waveforms: ``[B, S]``.
        lengths: ``[B]`` valid samples, or None for all S.

    Returns:
        ``[B, S]`` normalised waveforms (computed in fp32, returned in the input dtype).
    """
    x = waveforms.float()
    if lengths is None:
        valid = torch.ones_like(x)
    else:
        valid = (~lengths_to_padding_mask(lengths, x.size(1))).to(x.dtype)  # (B, S)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    return (((x - mean) / torch.sqrt(var + eps)) * valid).to(waveforms.dtype)


class CtcModel(FeatureEncoderGeometry, nn.Module):
    """Feature encoder + projection + context network + dropout + Linear head.

    Build it with :func:`build_ctc_model` (random init) or :func:`from_pretrained_wav2vec2`.

    Args:
        feature_encoder: raw waveform -> ``[B, T, C]``.
        feature_projection: ``[B, T, C]`` -> ``[B, T, D]``.
        context: the Transformer context network.
        cfg: the config the parts were built from.

    It implements :class:`~speechvq.models.protocol.AudioModel`.
    """

    model_type = "wav2vec2_ctc"
    has_transformer = True

    def __init__(
        self,
        feature_encoder: ConvFeatureEncoder,
        feature_projection: FeatureProjection,
        context: ContextNetwork,
        cfg: CtcConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = feature_encoder
        self.feature_projection = feature_projection
        self.context = context
        self.mask_embedding = nn.Parameter(torch.empty(cfg.context.dim).uniform_())
        self.final_dropout = nn.Dropout(cfg.final_dropout_p)
        self.lm_head = Linear(cfg.context.dim, cfg.vocab_size)
        nn.init.xavier_uniform_(self.lm_head.weight)
        nn.init.zeros_(self.lm_head.bias)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    # -- freezing -------------------------------------------------------------------------------

    def set_num_updates_(self, num_updates: int) -> None:
        """Set the update count that decides whether the body is still frozen."""
        self.num_updates.fill_(int(num_updates))

    @property
    def body_frozen(self) -> bool:
        """True while only the output layer trains (``num_updates < cfg.freeze_updates``)."""
        return int(self.num_updates) < self.cfg.freeze_updates

    def freeze_feature_encoder(self) -> None:
        """Never train the feature encoder: run it without autograd and drop its ``requires_grad``."""
        self.feature_encoder.grad_mult = 0.0
        self.cfg.encoder.grad_mult = 0.0
        for p in self.feature_encoder.parameters():
            p.requires_grad_(False)

    def head_parameters(self) -> list[nn.Parameter]:
        """The output layer's parameters (the only ones trained while :attr:`body_frozen`)."""
        return list(self.lm_head.parameters())

    # -- the AudioModel protocol -----------------------------------------------------------------

    # frame_stride, receptive_field, waveform_norm, output_lengths: FeatureEncoderGeometry

    @property
    def num_layers(self) -> int:
        return self.cfg.context.num_layers

    @torch.no_grad()
    def layer_features(
        self, waveforms: Tensor, lengths: Tensor | None, layer: Layer
    ) -> tuple[Tensor, Tensor]:
        """Unmasked features ``[B, T, D]`` of ``layer`` (see :mod:`speechvq.models.protocol`) of raw
        waveforms (normalised here when configured), and frame lengths ``[B]``."""
        check_layer(self, layer)
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        return transformer_layer(self, features, padding_mask, layer), frame_lengths

    # -- forward --------------------------------------------------------------------------------

    def encode(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-utterance waveform normalisation if configured (transformers' do_normalize), then the
        feature encoder: (features ``[B, T, C]``, frame lengths ``[B]``, padding mask or None)."""
        if self.cfg.normalize_waveform:
            waveforms = normalize_waveforms(waveforms, lengths)
        features, frame_lengths = self.feature_encoder(waveforms, lengths)
        return features, frame_lengths, padding_mask_or_none(frame_lengths, features.size(1))

    def forward(
        self,
        waveforms: Tensor,
        lengths: Tensor | None = None,
        *,
        time_mask: Tensor | None = None,
        channel_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CtcOutput:
        """Frame-level scores over the vocabulary.

        Args:
            waveforms: ``[B, S]`` samples.
            lengths: ``[B]`` valid samples per utterance (None: all S).
            time_mask: ``[B, T]`` frames to replace with the mask embedding; in training drawn with
                :func:`compute_span_mask` when None and ``cfg.mask.mask_prob > 0``.
            channel_mask: ``[B, D]`` model channels to zero for the whole utterance; in training
                drawn when None and ``cfg.mask.channel_prob > 0``.
            generator: RNG for the masks and LayerDrop.

        Returns:
            :class:`CtcOutput` (``logits [B, T, V]``, ``lengths [B]``).
        """
        # 1-2. optional waveform normalisation, feature encoder (without autograd when grad_mult == 0)
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        frames = features.size(1)

        # 3. the body runs without autograd for the first freeze_updates updates (fairseq)
        with torch.no_grad() if self.body_frozen else contextlib.nullcontext():
            x, _ = self.feature_projection(features)
            time_mask, channel_mask = self._draw_masks(
                frame_lengths, frames, time_mask, channel_mask, generator
            )
            if time_mask is not None:
                x = torch.where(time_mask[..., None], self.mask_embedding.to(x.dtype), x)
            if channel_mask is not None:
                x = x.masked_fill(channel_mask[:, None, :], 0.0)  # (B, D) -> (B, 1, D) over all frames
            hidden = self.context(x, padding_mask, layer_drop_generator=generator).last_hidden_state

        # 4. output layer
        logits = self.lm_head(self.final_dropout(hidden))
        return CtcOutput(logits=logits, lengths=frame_lengths, time_mask=time_mask)

    def _draw_masks(
        self,
        frame_lengths: Tensor,
        frames: int,
        time_mask: Tensor | None,
        channel_mask: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Time and channel masks: the given ones, else drawn in training when enabled."""
        m = self.cfg.mask
        if time_mask is None and self.training and m.mask_prob > 0:
            time_mask = compute_span_mask(
                frame_lengths,
                frames,
                mask_prob=m.mask_prob,
                mask_length=m.mask_length,
                min_masks=m.min_masks,
                require_same_masks=m.require_same_masks,
                generator=generator,
            )
        if channel_mask is None and self.training and m.channel_prob > 0:
            dim = self.cfg.context.dim
            channels = torch.full_like(frame_lengths, dim)
            channel_mask = compute_span_mask(
                channels, dim, mask_prob=m.channel_prob, mask_length=m.channel_length, generator=generator
            )
        return time_mask, channel_mask

    def compute_loss(
        self, output: CtcOutput, targets: Tensor, target_lengths: Tensor, reduction: str = "sum"
    ) -> Tensor:
        """CTC loss of ``output`` (see :func:`speechvq.losses_ctc.ctc_loss`)."""
        return ctc_loss(
            output.logits,
            output.lengths,
            targets,
            target_lengths,
            blank_id=self.cfg.blank_id,
            reduction=reduction,
        )


def build_ctc_model(cfg: CtcConfig, *, fast: bool = True) -> CtcModel:
    """Build a randomly initialised :class:`CtcModel` from its config; ``fast`` selects the fast
    kernels (:mod:`speechvq.models.kernels`), else plain PyTorch."""
    encoder = build_feature_encoder(cfg.encoder, fast=fast)
    projection = FeatureProjection(
        cfg.encoder.out_channels, cfg.context.dim, cfg.feature_dropout_p, cfg.context.layer_norm_eps
    )
    return kernels.select_(
        CtcModel(encoder, projection, build_context_network(cfg.context, fast=fast), cfg), fast=fast
    )


# Submodules copied from a pretrained Wav2Vec2Model (quantizer and projections are dropped).
_PRETRAINED_PARTS = ("feature_encoder.", "feature_projection.", "context.", "mask_embedding")


def from_pretrained_wav2vec2(
    w2v_model: Wav2Vec2Model, vocab_size: int, *, reinit_layers: int = 0, **settings: Any
) -> CtcModel:
    """A :class:`CtcModel` initialised from a pretrained wav2vec 2.0 model.

    The feature encoder, feature projection, context network and mask embedding are copied; the
    output layer is freshly initialised.

    Args:
        w2v_model: the pretrained model.
        vocab_size: V, including the blank.
        reinit_layers: re-initialise the top this many Transformer blocks instead of copying them
            (they keep the fresh initialisation of :func:`build_ctc_model`). The top blocks of a
            wav2vec 2.0 model are the most specialised to the contrastive task and the least
            phonetic (Pasad et al., 2021, "Layer-wise analysis of a self-supervised speech
            representation model"); with little pretraining, re-initialising them fine-tunes faster.
        **settings: fine-tuning settings, see :func:`ctc_config_from_wav2vec2`.

    Returns:
        The model, in training mode, with the feature encoder frozen.
    """
    num_layers = w2v_model.cfg.context.num_layers
    if not 0 <= reinit_layers <= num_layers:
        raise ValueError(
            f"`reinit_layers` must be in [0, {num_layers}] (the model's blocks), but is {reinit_layers} instead."
        )
    cfg = ctc_config_from_wav2vec2(w2v_model.cfg, vocab_size, **settings)
    model = build_ctc_model(cfg)
    fresh = tuple(f"context.layers.{i}." for i in range(num_layers - reinit_layers, num_layers))

    def copied(key: str) -> bool:
        return key.startswith(_PRETRAINED_PARTS) and not key.startswith(fresh)

    pretrained = {k: v for k, v in w2v_model.state_dict().items() if copied(k)}
    missing, unexpected = model.load_state_dict(pretrained, strict=False)
    not_copied = [k for k in missing if copied(k)]
    if not_copied or unexpected:
        raise ValueError(
            f"`w2v_model` must match the CTC architecture, but {not_copied[:5]} were missing and "
            f"{unexpected[:5]} unexpected instead."
        )
    model.freeze_feature_encoder()
    return model.train()


def save_ctc_pretrained(model: CtcModel, vocab: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` with its vocabulary (embedded in ``config.json``) in speechvq's format.

    Args:
        model: the model.
        vocab: its :class:`speechvq.text.Vocabulary` (``len(vocab) == model.cfg.vocab_size``).
        directory: output directory (replaced atomically).
    """
    from speechvq.io import save_pretrained

    if len(vocab) != model.cfg.vocab_size:
        raise ValueError(f"`vocab` must have {model.cfg.vocab_size} tokens, but has {len(vocab)} instead.")
    return save_pretrained(model, directory, extra={"vocabulary": vocab.to_dict()})


def load_ctc_pretrained(directory: str | os.PathLike[str]) -> tuple[CtcModel, Any]:
    """Read a directory written by :func:`save_ctc_pretrained`: (model in eval mode, vocabulary).

    Raises:
        UserInputError: if the directory holds no CTC model or no vocabulary.
    """
    from speechvq.errors import UserInputError
    from speechvq.io import CONFIG_NAME, load_pretrained, read_config
    from speechvq.text.vocab import Vocabulary

    meta = read_config(directory)
    if meta["model_type"] != CtcModel.model_type:
        raise UserInputError(
            f"{Path(directory) / CONFIG_NAME}: holds a {meta['model_type']!r} model, not a CTC model "
            f"({CtcModel.model_type!r}); fine-tune it first (speechvq finetune-ctc)"
        )
    if "vocabulary" not in meta:
        raise UserInputError(f'{Path(directory) / CONFIG_NAME}: no "vocabulary" entry')
    try:
        vocab = Vocabulary.from_dict(meta["vocabulary"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{Path(directory) / CONFIG_NAME}: invalid vocabulary: {err}") from None
    model = load_pretrained(directory)
    assert isinstance(model, CtcModel)
    return model, vocab
