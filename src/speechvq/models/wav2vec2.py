"""wav2vec 2.0 (Baevski et al., 2020): conv encoder, quantizer, masked Transformer context network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from speechvq.config import Wav2Vec2Config
from speechvq.losses import (
    LossBreakdown,
    contrastive_logits,
    contrastive_loss,
    diversity_loss,
    feature_penalty,
)
from speechvq.models.common import Dropout, Linear, padding_mask_or_none
from speechvq.models.context import ContextNetwork, build_context_network
from speechvq.models.encoder import ConvFeatureEncoder, build_feature_encoder
from speechvq.models.kmeans_quantizer import KMeansVectorQuantizer, build_kmeans_quantizer
from speechvq.models.masking import (
    compute_span_mask,
    compute_span_mask_per_utterance,
    sample_distractors,
    sample_distractors_per_utterance,
)
from speechvq.models.quantizer import GumbelVectorQuantizer, QuantizerOutput, build_quantizer


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
    """Everything :meth:`Wav2Vec2Model.forward` computes. N = number of masked frames."""

    features: Tensor
    """``[B, T, C]`` feature encoder output (before its LayerNorm)."""
    lengths: Tensor
    """``[B]`` valid frames."""
    mask: Tensor
    """``[B, T]`` bool, masked frames."""
    context: Tensor
    """``[B, T, D]`` final context network output; ``[N, D]`` at the masked frames, in
    ``target_index`` order, with ``masked_only``."""
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


class Wav2Vec2Model(nn.Module):
    """The wav2vec 2.0 pretraining model. Build it with :func:`build_wav2vec2`.

    Args:
        feature_encoder: raw waveform -> ``[B, T, C]``.
        feature_projection: ``[B, T, C]`` -> ``[B, T, D]``.
        quantizer: quantizes the normalised encoder features into targets.
        context: the Transformer context network.
        cfg: the config the parts were built from (masking and loss settings are read from it).
    """

    def __init__(
        self,
        feature_encoder: ConvFeatureEncoder,
        feature_projection: FeatureProjection,
        quantizer: GumbelVectorQuantizer | KMeansVectorQuantizer,
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

    def set_cross_process_sum_(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Batch statistics of the loss (the code perplexities of the diversity loss, the feature
        penalty's mean) are taken over the whole data-parallel batch in training: ``fn`` sums a
        tensor over the processes with gradient (e.g. ``torch.distributed.nn.functional.all_reduce``).
        With it, W processes with batch b compute the loss of one process with batch W * b."""
        self.cross_process_sum = fn
        if isinstance(self.quantizer, GumbelVectorQuantizer):
            self.quantizer.reduce_marginal = fn

    def set_num_updates_(self, num_updates: int) -> None:
        """Set the update count that anneals the Gumbel temperature."""
        self.quantizer.set_num_updates_(num_updates)

    def encode(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Feature encoder: (features ``[B, T, C]``, frame lengths ``[B]``, padding mask or None)."""
        features, frame_lengths = self.feature_encoder(waveforms, lengths)
        return features, frame_lengths, padding_mask_or_none(frame_lengths, features.size(1))

    def forward(
        self,
        waveforms: Tensor,
        lengths: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        distractor_index: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
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
            generator: RNG for the mask and distractors; or one generator per utterance, which
                then also draws that utterance's Gumbel noise, so that an utterance's mask,
                distractors and noise do not depend on the rest of the batch (training invariant
                to how utterances are split over processes).
            layer_drop_generator: RNG for the LayerDrop decisions; seed it identically on every
                data-parallel rank so that all ranks skip the same blocks.
            masked_only: compute the context network's last block at the masked frames only,
                which is all the loss reads (the trainer sets it): the loss and its gradients are
                the same, ``context`` is then ``[N, D]`` in ``target_index`` order, and
                ``hidden_states`` leaves out the last block's output.

        Returns:
            :class:`Wav2Vec2Output`; :meth:`compute_loss` turns it into the loss.
        """
        # 1. encode the waveform and normalise + project the features
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        batch, frames, _ = features.shape
        pen = feature_penalty(features, padding_mask, self.cross_process_sum if self.training else None)
        projected, normed = self.feature_projection(features)

        # 2. mask spans of the projected features with the learned mask embedding
        per_utt = generator is not None and not isinstance(generator, torch.Generator)
        gens = list(generator) if per_utt else None  # type: ignore[arg-type]
        single = None if per_utt else generator
        if mask is None and gens is not None:
            m = self.cfg.mask
            mask = compute_span_mask_per_utterance(
                frame_lengths, frames, mask_prob=m.mask_prob, mask_length=m.mask_length,
                min_masks=m.min_masks, require_same_masks=m.require_same_masks, generators=gens,
            )  # fmt: skip
        elif mask is None:
            m = self.cfg.mask
            mask = compute_span_mask(
                frame_lengths,
                frames,
                mask_prob=m.mask_prob,
                mask_length=m.mask_length,
                min_masks=m.min_masks,
                require_same_masks=m.require_same_masks,
                generator=single,
            )
        masked = torch.where(mask[..., None], self.mask_embedding.to(projected.dtype), projected)

        # 3. contextualise
        ctx = self.context(
            masked,
            padding_mask,
            layer_drop_generator=layer_drop_generator,
            output_frames=mask if masked_only else None,
        )

        # 4. quantize the (unmasked) normalised features; the perplexities of the diversity loss
        # over the masked frames, as fairseq (which quantizes only those) and transformers
        valid = ~padding_mask if padding_mask is not None else None
        if isinstance(self.quantizer, GumbelVectorQuantizer):
            q = self.quantizer(self.quantizer_dropout(normed), valid, generators=gens, counted=mask)
        else:
            q = self.quantizer(self.quantizer_dropout(normed), valid, generators=gens)

        # 5. project predictions and targets of the masked frames only to the final dim
        if distractor_index is None and gens is not None:
            target_index, distractor_index = sample_distractors_per_utterance(
                mask, self.cfg.loss.num_negatives, gens
            )
        elif distractor_index is None:
            target_index, distractor_index = sample_distractors(mask, self.cfg.loss.num_negatives, single)
        else:
            target_index = mask.reshape(-1).nonzero().squeeze(-1)
        if masked_only:  # the masked frames in row-major order: target_index's order
            predictions = self.project_hid(ctx.last_hidden_state)
        else:
            predictions = self.project_hid(ctx.last_hidden_state.reshape(batch * frames, -1)[target_index])
        # the frames that are a target or a distractor (the masked ones), in flat order
        used = torch.zeros(batch * frames, dtype=torch.bool, device=mask.device)
        used[target_index] = True
        used[distractor_index.reshape(-1)] = True
        row_of = used.cumsum(0) - 1  # flat index -> row among the used frames
        quantized = q.quantized.reshape(batch * frames, -1)[used]
        candidates = self.project_q(quantized.to(self.project_q.weight.dtype))  # (M, F)
        target_pos, distractor_pos = row_of[target_index], row_of[distractor_index]
        targets = candidates[target_pos]

        # 6. cosine-similarity logits / kappa, in fp32 (eq. 3), scored against the M used frames
        logits = contrastive_logits(
            predictions, candidates, target_pos, distractor_pos, self.cfg.loss.logit_temp
        )
        return Wav2Vec2Output(
            features=features,
            lengths=frame_lengths,
            mask=mask,
            context=ctx.last_hidden_state,
            hidden_states=ctx.hidden_states,
            quantizer=q,
            predictions=predictions,
            targets=targets,
            logits=logits,
            target_index=target_index,
            distractor_index=distractor_index,
            features_penalty=pen,
        )

    def compute_loss(self, output: Wav2Vec2Output) -> LossBreakdown:
        """L = L_m + alpha * N * L_d + beta * N * penalty, each summed over the N targets."""
        n = output.num_targets
        weights = self.cfg.loss
        lm = contrastive_loss(output.logits)
        ld = (
            weights.diversity_weight
            * n
            * diversity_loss(output.quantizer.prob_perplexity, output.quantizer.num_codes)
        )
        if output.quantizer.extra_loss is not None:  # k-means: codebook + commitment loss instead
            ld = self.cfg.kmeans.loss_weight * n * output.quantizer.extra_loss
        lp = weights.feature_penalty_weight * n * output.features_penalty
        return LossBreakdown(
            total=lm + ld + lp, contrastive=lm, diversity=ld, feature_penalty=lp, num_targets=n
        )

    @torch.no_grad()
    def quantize(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[QuantizerOutput, Tensor]:
        """Quantizer output (codes ``[B, T, G]``) of unmasked input, and frame lengths ``[B]``."""
        features, frame_lengths, padding_mask = self.encode(waveforms, lengths)
        _, normed = self.feature_projection(features)
        valid = ~padding_mask if padding_mask is not None else None
        return self.quantizer(normed, valid), frame_lengths

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


def build_wav2vec2(cfg: Wav2Vec2Config) -> Wav2Vec2Model:
    """Build a :class:`Wav2Vec2Model` from its config."""
    encoder = build_feature_encoder(cfg.encoder)
    projection = FeatureProjection(
        cfg.encoder.out_channels, cfg.context.dim, cfg.feature_dropout_p, cfg.context.layer_norm_eps
    )
    quantizer: GumbelVectorQuantizer | KMeansVectorQuantizer
    if cfg.quantizer_type == "kmeans":
        quantizer = build_kmeans_quantizer(cfg.kmeans, cfg.encoder.out_channels)
    else:
        quantizer = build_quantizer(cfg.quantizer, cfg.encoder.out_channels)
    context = build_context_network(cfg.context)
    return Wav2Vec2Model(encoder, projection, quantizer, context, cfg)
