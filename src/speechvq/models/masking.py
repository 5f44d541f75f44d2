"""Span masking and distractor sampling, in torch, on the model's device.

Semantics follow fairseq's ``compute_mask_indices`` (static span lengths) and
``Wav2Vec2Model.sample_negatives``; randomness comes from a :class:`~speechvq.models.randomness.Draws`
(or a plain generator): one generator for the batch, or one per utterance, which makes an
utterance's draws independent of the batch it is in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from speechvq.models.randomness import Draws, RandomSource


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is not None and generator.device != device:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)
    return torch.rand(shape, generator=generator, device=device)


def _keep_random(candidates: Tensor, counts: Tensor, generator: torch.Generator | None) -> Tensor:
    """Per row, keep ``counts[b]`` of the True entries of ``candidates``, uniformly without replacement."""
    keys = _rand(tuple(candidates.shape), candidates.device, generator)
    keys = keys.masked_fill(~candidates, 2.0)  # never chosen before a candidate
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def compute_span_mask(
    lengths: Tensor,
    max_len: int,
    *,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    require_same_masks: bool = False,
    generator: RandomSource = None,
) -> Tensor:
    """Random time spans to mask.

    Per utterance of T_b valid frames: ``n = floor(mask_prob * T_b / M + u)`` spans (u uniform
    in [0, 1)), at least ``min_masks``; span starts are drawn without replacement from the first
    ``max(T_b - M, n + 1)`` frames and spans are clipped to the valid frames, so padding is never
    masked. ``mask_prob=0.65, M=10`` masks about 49% of frames.

    Args:
        lengths: ``[B]`` valid frames per utterance.
        max_len: T.
        mask_prob: expected span starts per frame, times M.
        mask_length: M.
        min_masks: minimum spans per utterance.
        require_same_masks: trim every row to the smallest masked count of the batch.
        generator: the draws (:class:`Draws`, a generator or None). With one generator per
            utterance, utterance ``b`` draws only from its own and only for its valid frames, so
            its mask does not depend on the rest of the batch or on the padding (except for the
            batch-wide trim of ``require_same_masks``, which draws from each row's generator too).

    Returns:
        ``[B, T]`` bool, True where masked.
    """
    draws = Draws.of(generator)
    spans = dict(mask_prob=mask_prob, mask_length=mask_length, min_masks=min_masks)
    if draws.per_utterance:
        return _span_mask_per_utterance(lengths, max_len, draws, require_same_masks, **spans)
    return _span_mask(lengths, max_len, draws.generator, require_same_masks, **spans)


def _span_mask(
    lengths: Tensor,
    max_len: int,
    generator: torch.Generator | None,
    require_same_masks: bool,
    *,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
) -> Tensor:
    """:func:`compute_span_mask` with one generator (or the global RNG) for the batch."""
    device = lengths.device
    lengths = lengths.to(torch.long)
    batch = lengths.numel()
    u = _rand((batch,), device, generator)
    num = torch.floor(mask_prob * lengths.to(torch.float64) / mask_length + u.to(torch.float64)).to(
        torch.long
    )
    num = num.clamp(min=min_masks)
    num = torch.minimum(num, (lengths - 1).clamp(min=0))  # distinct starts need num < T_b (as fairseq)
    start_range = torch.maximum(lengths - mask_length, num + 1)
    positions = torch.arange(max_len, device=device)
    starts = _keep_random(positions[None, :] < start_range[:, None], num, generator)
    # A frame is masked when a span starts in (t - M, t]: difference of a running count of starts.
    count = starts.to(torch.int32).cumsum(dim=1)
    shifted = torch.nn.functional.pad(count, (mask_length, 0))[:, :max_len]
    mask = (count - shifted) > 0
    mask &= positions[None, :] < lengths[:, None]
    if require_same_masks and batch > 0:
        per_row = mask.sum(dim=1)
        mask = _keep_random(mask, torch.full_like(per_row, int(per_row.min())), generator)
    return mask


def sample_distractors(
    mask: Tensor, num_negatives: int, generator: RandomSource = None
) -> tuple[Tensor, Tensor]:
    """Draw K distractors for every masked frame from the masked frames of the same utterance.

    A distractor is never the target frame itself (indices at or after the target's are shifted
    by one, which keeps the draw uniform over the other frames) and never padding. An utterance
    with a single masked frame has no other frame to draw from: its distractors point at the
    target itself, and :func:`contrastive_logits` gives them -inf.

    Args:
        mask: ``[B, T]`` bool, masked frames.
        num_negatives: K.
        generator: the draws (:class:`Draws`, a generator or None); with one generator per
            utterance, an utterance's distractors depend only on its own masked frames.

    Returns:
        ``target_index`` ``[N]`` and ``distractor_index`` ``[N, K]``, flat indices into the
        ``B * T`` frames (N = number of masked frames, utterance-major order).
    """
    draws = Draws.of(generator)
    if draws.per_utterance:
        return _distractors_per_utterance(mask, num_negatives, draws)
    return _distractors(mask, num_negatives, draws.generator)


def _distractors(
    mask: Tensor, num_negatives: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """:func:`sample_distractors` with one generator (or the global RNG) for the batch."""
    _batch, frames = mask.shape
    target_index = mask.reshape(-1).nonzero().squeeze(-1)  # (N,)
    utt = torch.div(target_index, frames, rounding_mode="floor")
    counts = mask.sum(dim=1)  # (B,)
    offsets = counts.cumsum(0) - counts  # first packed index of each utterance
    n_of = counts[utt]  # (N,) masked frames in the target's utterance
    local = torch.arange(target_index.numel(), device=mask.device) - offsets[utt]  # (N,)
    draws = _rand((target_index.numel(), num_negatives), mask.device, generator)
    # uniform over [0, n - 2], then skip the target's own slot
    sampled = torch.floor(draws * (n_of - 1).clamp(min=0)[:, None].to(draws.dtype)).to(torch.long)
    sampled = sampled + (sampled >= local[:, None]).to(torch.long)
    sampled = torch.where((n_of < 2)[:, None], local[:, None].expand_as(sampled), sampled)
    sampled = torch.minimum(sampled, (n_of - 1).clamp(min=0)[:, None])
    distractor_index = target_index[offsets[utt][:, None] + sampled]  # packed -> flat (N, K)
    return target_index, distractor_index


def _span_mask_per_utterance(
    lengths: Tensor,
    max_len: int,
    draws: Draws,
    require_same_masks: bool,
    *,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
) -> Tensor:
    """:func:`compute_span_mask` with one generator per utterance."""
    draws.check_batch(lengths.numel())
    rows = []
    for b, n in enumerate(lengths.tolist()):  # draw over the valid frames only, then pad
        row = _span_mask(
            lengths[b : b + 1], int(n), draws.utterance(b), False,
            mask_prob=mask_prob, mask_length=mask_length, min_masks=min_masks,
        )  # fmt: skip
        rows.append(torch.nn.functional.pad(row, (0, max_len - int(n))))
    mask = torch.cat(rows) if rows else torch.zeros(0, max_len, dtype=torch.bool, device=lengths.device)
    if require_same_masks and rows:
        keep = int(mask.sum(dim=1).min())
        trimmed = []
        for b, n in enumerate(lengths.tolist()):
            row = _keep_random(
                mask[b : b + 1, : int(n)], torch.full((1,), keep, device=mask.device), draws.utterance(b)
            )
            trimmed.append(torch.nn.functional.pad(row, (0, max_len - int(n))))
        mask = torch.cat(trimmed)
    return mask


def _distractors_per_utterance(mask: Tensor, num_negatives: int, draws: Draws) -> tuple[Tensor, Tensor]:
    """:func:`sample_distractors` with one generator per utterance (same output layout)."""
    batch, frames = mask.shape
    draws.check_batch(batch)
    targets, distractors = [], []
    for b in range(batch):
        # the draws only depend on this row's masked frames (their count and order), not on T
        t, d = _distractors(mask[b : b + 1], num_negatives, draws.utterance(b))
        targets.append(t + b * frames)
        distractors.append(d + b * frames)
    if not targets:
        empty = torch.zeros(0, dtype=torch.long, device=mask.device)
        return empty, empty.view(0, num_negatives)
    return torch.cat(targets), torch.cat(distractors)
