"""wav2vec 2.0 (Baevski et al., 2020): conv encoder, quantizer, masked Transformer context network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from speechvq.config import Wav2Vec2Config
from speechvq.losses import LossBreakdown, contrastive_logits, contrastive_loss, feature_penalty
from speechvq.models import kernels
from speechvq.models.common import Dropout, Linear, padding_mask_or_none
from speechvq.models.context import ContextNetwork, ContextOutput, build_context_network
from speechvq.models.encoder import ConvFeatureEncoder, build_feature_encoder
from speechvq.models.kmeans_quantizer import build_kmeans_quantizer
from speechvq.models.masking import compute_span_mask, sample_distractors
from speechvq.models.protocol import TRANSFORMER_INPUT, FeatureEncoderGeometry, Layer, check_layer
from speechvq.models.quantizer import QuantizerOutput, VectorQuantizer, build_quantizer
from speechvq.models.randomness import Draws, RandomSource


class FeatureProjection(nn.Module):
    """LayerNorm over encoder channels, Linear to the model dim, dropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout_p: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=eps)
        self.linear = Linear(in_dim, out_dim)
        self.dropout = Dropout(dropout_p)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, T, C]`` -> (projected ``[B, T, D]``, normalised features ``[B, T, C]``)."""
        normed = self.layer_norm(features)
        return self.dropout(self.linear(normed)), normed


@dataclass
class Wav2Vec2Output:
    """Everything :meth:`Wav2Vec2Model.forward` computes. N = number of masked frames.

    Every field has one shape whatever the forward's options: ``masked_only`` leaves ``context``
    None rather than changing its shape.
    """

    features: Tensor
    """``[B, T, C]`` feature encoder output (before its LayerNorm)."""
    lengths: Tensor
    """``[B]`` valid frames."""
    mask: Tensor
    """``[B, T]`` bool, masked frames."""
    context: Tensor | None
    """``[B, T, D]`` final context network output; None when the forward ran with
    ``masked_only`` (only ``masked_context`` was computed)."""
    masked_context: Tensor
    """``[N, D]`` final context network output at the masked frames, in ``target_index`` order."""
    hidden_states: Sequence[Tensor]
    """Context network input, then each block's output (see :class:`ContextOutput`)."""
    quantizer: QuantizerOutput
    predictions: Tensor
    """``[N, F]`` context outputs at masked frames projected to the final dim."""
    targets: Tensor
    """``[N, F]`` projected quantized vectors at masked frames."""
    logits: Tensor
    """``[N, K + 1]`` contrastive logits (fp32), the target first."""
    target_index: Tensor
    """``[N]`` flat indices of the masked frames into ``B * T``."""
    distractor_index: Tensor
    """``[N, K]`` flat indices of the distractors into ``B * T``."""
    features_penalty: Tensor
    """Scalar mean squared encoder activation over valid frames."""

    @property
    def num_targets(self) -> int:
        return int(self.logits.size(0))


@dataclass
class Contrast:
    """What :meth:`Wav2Vec2Model.contrast` computes for N masked frames."""

    predictions: Tensor
    """``[N, F]`` projected context outputs."""
    targets: Tensor
    """``[N, F]`` projected quantized vectors of the targets."""
    logits: Tensor
    """``[N, K + 1]`` fp32 logits, the target first."""


class Wav2Vec2Model(FeatureEncoderGeometry, nn.Module):
    """The wav2vec 2.0 pretraining model. Build it with :func:`build_wav2vec2`.

    The forward pass is a composition of named stages, each a public method: :meth:`encode`,
    :meth:`mask`, :meth:`contextualise`, :meth:`quantize_targets`, :meth:`sample_targets` and
    :meth:`contrast`. It implements :class:`~speechvq.models.protocol.AudioModel`.

    Args:
        feature_encoder: raw waveform -> ``[B, T, C]``.
        feature_projection: ``[B, T, C]`` -> ``[B, T, D]``.
        quantizer: quantizes the normalised encoder features into targets.
        context: the Transformer context network.
        cfg: the config the parts were built from (masking and loss settings are read from it).
    """

    model_type = "wav2vec2"
    has_transformer = True

    def __init__(
        self,
        feature_encoder: ConvFeatureEncoder,
        feature_projection: FeatureProjection,
        quantizer: VectorQuantizer,
        context: ContextNetwork,
        cfg: Wav2Vec2Config,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = feature_encoder
        self.feature_projection = feature_projection
        self.quantizer = quantizer
        self.context = context
        self.mask_embedding = nn.Parameter(torch.empty(cfg.context.dim).uniform_())
        self.quantizer_dropout = Dropout(cfg.quantizer.dropout_p)
        self.project_q = Linear(cfg.codevector_dim, cfg.final_dim)
        self.project_hid = Linear(cfg.context.dim, cfg.final_dim)
        self.cross_process_sum: Callable[[Tensor], Tensor] | None = None

    # -- the AudioModel protocol -----------------------------------------------------------------

    # frame_stride, receptive_field, waveform_norm, output_lengths: FeatureEncoderGeometry

    @property
    def num_layers(self) -> int:
        return self.cfg.context.num_layers

    @torch.no_grad()
    def layer_features(
        self, waveforms: Tensor, lengths: Tensor | None, layer: Layer
    ) -> tuple[Tensor, Tensor]:
        """Unmasked features ``[B, T, D]`` of ``layer`` (see :mod:`speechvq.models.protocol`) and
        frame lengths ``[B]``."""
        check_layer(self, layer)
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        return transformer_layer(self, features, padding_mask, layer), frame_lengths

    # -- training state --------------------------------------------------------------------------

    def set_cross_process_sum_(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Batch statistics of the loss (the quantizer's, see
        :meth:`~speechvq.models.quantizer.VectorQuantizer.set_cross_process_sum_`, and the feature
        penalty's mean) are taken over the whole data-parallel batch in training: ``fn`` sums a
        tensor over the processes with gradient (e.g. ``torch.distributed.nn.functional.all_reduce``).
        With it, W processes with batch b compute the loss of one process with batch W * b."""
        self.cross_process_sum = fn
        self.quantizer.set_cross_process_sum_(fn)

    def set_num_updates_(self, num_updates: int) -> None:
        """Set the update count that anneals the Gumbel temperature."""
        self.quantizer.set_num_updates_(num_updates)

    # -- the stages of the forward pass ----------------------------------------------------------

    def encode(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Feature encoder: (features ``[B, T, C]``, frame lengths ``[B]``, padding mask or None)."""
        features, frame_lengths = self.feature_encoder(waveforms, lengths)
        return features, frame_lengths, padding_mask_or_none(frame_lengths, features.size(1))

    def mask(
        self, projected: Tensor, frame_lengths: Tensor, mask: Tensor | None, draws: Draws
    ) -> tuple[Tensor, Tensor]:
        """Replace spans of the projected features ``[B, T, D]`` by the learned mask embedding:
        (masked features, the ``[B, T]`` mask, drawn with :func:`compute_span_mask` if None)."""
        if mask is None:
            m = self.cfg.mask
            mask = compute_span_mask(
                frame_lengths, projected.size(1), mask_prob=m.mask_prob, mask_length=m.mask_length,
                min_masks=m.min_masks, require_same_masks=m.require_same_masks, generator=draws,
            )  # fmt: skip
        masked = torch.where(mask[..., None], self.mask_embedding.to(projected.dtype), projected)
        return masked, mask

    def contextualise(
        self,
        masked: Tensor,
        padding_mask: Tensor | None,
        mask: Tensor,
        *,
        layer_drop_generator: torch.Generator | None,
        masked_only: bool,
    ) -> ContextOutput:
        """The context network over the masked features; with ``masked_only`` its last block runs
        at the masked frames only (``last_hidden_state`` is then ``[N, D]``)."""
        return self.context(
            masked,
            padding_mask,
            layer_drop_generator=layer_drop_generator,
            output_frames=mask if masked_only else None,
        )

    def quantize_targets(
        self, normed: Tensor, padding_mask: Tensor | None, mask: Tensor, draws: Draws
    ) -> QuantizerOutput:
        """Quantize the unmasked normalised features ``[B, T, C]``; the perplexities of the
        diversity loss cover the masked frames, as fairseq (which quantizes only those) and
        transformers count them."""
        valid = ~padding_mask if padding_mask is not None else None
        return self.quantizer(self.quantizer_dropout(normed), valid, draws=draws, counted=mask)

    def sample_targets(
        self, mask: Tensor, distractor_index: Tensor | None, draws: Draws
    ) -> tuple[Tensor, Tensor]:
        """(``target_index`` ``[N]``, ``distractor_index`` ``[N, K]``), flat indices into ``B * T``:
        the masked frames, and K distractors each (drawn with :func:`sample_distractors` if None)."""
        if distractor_index is None:
            return sample_distractors(mask, self.cfg.loss.num_negatives, draws)
        return mask.reshape(-1).nonzero().squeeze(-1), distractor_index

    def contrast(
        self, masked_context: Tensor, quantized: Tensor, target_index: Tensor, distractor_index: Tensor
    ) -> Contrast:
        """Project the context outputs at the masked frames ``[N, D]`` and the quantized vectors
        ``[B, T, codevector_dim]`` of the frames they are scored against to the final dim, and
        take the cosine-similarity logits / kappa in fp32 (eq. 3)."""
        batch, frames, _ = quantized.shape
        predictions = self.project_hid(masked_context)
        # the frames that are a target or a distractor (the masked ones), in flat order
        used = torch.zeros(batch * frames, dtype=torch.bool, device=quantized.device)
        used[target_index] = True
        used[distractor_index.reshape(-1)] = True
        row_of = used.cumsum(0) - 1  # flat index -> row among the used frames
        candidates = quantized.reshape(batch * frames, -1)[used]  # (B, T, Q) -> (M, Q)
        candidates = self.project_q(candidates.to(self.project_q.weight.dtype))  # (M, F)
        target_pos, distractor_pos = row_of[target_index], row_of[distractor_index]
        logits = contrastive_logits(
            predictions, candidates, target_pos, distractor_pos, self.cfg.loss.logit_temp
        )
        return Contrast(predictions=predictions, targets=candidates[target_pos], logits=logits)

    def forward(
        self,
        waveforms: Tensor,
        lengths: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        distractor_index: Tensor | None = None,
        generator: RandomSource = None,
        layer_drop_generator: torch.Generator | None = None,
        masked_only: bool = False,
    ) -> Wav2Vec2Output:
        """The pretraining forward pass.

        Args:
            waveforms: ``[B, S]`` samples.
            lengths: ``[B]`` valid samples per utterance (None: all S).
            mask: ``[B, T]`` frames to mask; drawn with :func:`compute_span_mask` if None.
            distractor_index: ``[N, K]`` flat distractor indices (see :func:`sample_distractors`);
                drawn if None.
            generator: the draws of the mask, the distractors and the Gumbel noise
                (:class:`~speechvq.models.randomness.Draws`, or what ``Draws.of`` takes): one
                generator for the batch, or one per utterance, which then also draws that
                utterance's Gumbel noise, so that an utterance's mask, distractors and noise do not
                depend on the rest of the batch (training invariant to how utterances are split
                over processes).
            layer_drop_generator: RNG for the LayerDrop decisions; seed it identically on every
                data-parallel rank so that all ranks skip the same blocks.
            masked_only: compute the context network's last block at the masked frames only,
                which is all the loss reads (the trainer sets it): the loss and its gradients are
                the same, ``context`` is then None and ``hidden_states`` leaves out the last
                block's output.

        Returns:
            :class:`Wav2Vec2Output`; :meth:`compute_loss` turns it into the loss.
        """
        draws = Draws.of(generator)
        # 1. encode the waveform, penalise the features' scale, normalise + project them
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        reduce = self.cross_process_sum if self.training else None
        penalty = feature_penalty(features, padding_mask, reduce)
        projected, normed = self.feature_projection(features)
        # 2. mask spans of the projected features with the learned mask embedding
        masked, mask = self.mask(projected, frame_lengths, mask, draws)
        # 3. contextualise
        ctx = self.contextualise(
            masked, padding_mask, mask, layer_drop_generator=layer_drop_generator, masked_only=masked_only
        )
        # 4. quantize the unmasked normalised features into the targets
        q = self.quantize_targets(normed, padding_mask, mask, draws)
        # 5. pick the targets and their distractors, score the context outputs against them
        target_index, distractor_index = self.sample_targets(mask, distractor_index, draws)
        last = ctx.last_hidden_state
        # with masked_only the last state holds the masked frames in row-major order: target_index's
        masked_context = last if masked_only else last.reshape(-1, last.size(-1))[target_index]
        scored = self.contrast(masked_context, q.quantized, target_index, distractor_index)
        return Wav2Vec2Output(
            features=features, lengths=frame_lengths, mask=mask, context=None if masked_only else last,
            masked_context=masked_context, hidden_states=ctx.hidden_states, quantizer=q,
            predictions=scored.predictions, targets=scored.targets, logits=scored.logits,
            target_index=target_index, distractor_index=distractor_index, features_penalty=penalty,
        )  # fmt: skip

    def compute_loss(self, output: Wav2Vec2Output) -> LossBreakdown:
        """L = L_m + w_q * N * L_q + beta * N * penalty, each summed over the N targets; L_q is the
        quantizer's own term (the diversity loss, weight alpha; or the k-means codebook +
        commitment loss, weight ``kmeans.loss_weight``)."""
        n = output.num_targets
        lm = contrastive_loss(output.logits)
        lq = self.quantizer_loss_weight * n * output.quantizer.loss
        lp = self.cfg.loss.feature_penalty_weight * n * output.features_penalty
        return LossBreakdown(
            total=lm + lq + lp, contrastive=lm, diversity=lq, feature_penalty=lp, num_targets=n
        )

    @property
    def quantizer_loss_weight(self) -> float:
        """The weight of the quantizer's loss term."""
        if self.cfg.quantizer_type == "kmeans":
            return self.cfg.kmeans.loss_weight
        return self.cfg.loss.diversity_weight

    # -- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def quantize(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[QuantizerOutput, Tensor]:
        """Quantizer output (codes ``[B, T, G]``) of unmasked input, and frame lengths ``[B]``."""
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        return self.quantize_features(features, padding_mask), frame_lengths

    @torch.no_grad()
    def quantize_features(self, features: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput:
        """Quantizer output of encoder features ``[B, T, C]`` (unmasked; e.g. a window's)."""
        _, normed = self.feature_projection(features)
        valid = ~padding_mask if padding_mask is not None else None
        return self.quantizer(normed, valid)

    def extract_features(
        self, waveforms: Tensor, lengths: Tensor | None = None, num_layers: int | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Unmasked features of every Transformer block (torchaudio's ``extract_features``).

        Args:
            waveforms: ``[B, S]``.
            lengths: ``[B]`` samples, or None.
            num_layers: run only this many blocks (all if None).

        Returns:
            A list with one ``[B, T, D]`` tensor per block that ran, and ``[B]`` frame lengths.
        """
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        projected, _ = self.feature_projection(features)
        ctx = self.context(projected, padding_mask, num_layers=num_layers)
        return list(ctx.hidden_states[1:]), frame_lengths


def transformer_layer(model: Any, features: Tensor, padding_mask: Tensor | None, layer: Layer) -> Tensor:
    """Unmasked ``[B, T, D]`` features of ``layer`` from encoder features ``[B, T, C]``, for a
    model with ``feature_projection`` and ``context`` (wav2vec 2.0, CTC)."""
    if layer == 0:
        return features
    x, _ = model.feature_projection(features)
    depth = 0 if layer == TRANSFORMER_INPUT else int(layer)
    # with num_layers the last state is block `depth`'s output (no final LayerNorm); reading it,
    # not hidden_states[depth], unpacks the packed CPU states once
    return model.context(x, padding_mask, num_layers=depth).last_hidden_state


def build_wav2vec2(cfg: Wav2Vec2Config, *, fast: bool = True) -> Wav2Vec2Model:
    """Build a :class:`Wav2Vec2Model` from its config.

    Args:
        cfg: the model config.
        fast: build with the fast kernels (:mod:`speechvq.models.kernels`; the default), or with
            plain PyTorch modules. Both have the same parameters and state dict and compute the
            same values to rounding; :func:`speechvq.models.kernels.select_` switches a built model.
    """
    encoder = build_feature_encoder(cfg.encoder, fast=fast)
    projection = FeatureProjection(
        cfg.encoder.out_channels, cfg.context.dim, cfg.feature_dropout_p, cfg.context.layer_norm_eps
    )
    quantizer: VectorQuantizer
    if cfg.quantizer_type == "kmeans":
        quantizer = build_kmeans_quantizer(cfg.kmeans, cfg.encoder.out_channels)
    else:
        quantizer = build_quantizer(cfg.quantizer, cfg.encoder.out_channels, fast=fast)
    context = build_context_network(cfg.context, fast=fast)
    return kernels.select_(Wav2Vec2Model(encoder, projection, quantizer, context, cfg), fast=fast)
