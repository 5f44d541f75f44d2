"""wav2vec's future-prediction objective (Schneider et al., 2019, eq. 1; fairseq
``Wav2VecPredictionsModel`` with ``infonce=False``), used by vq-wav2vec.

For every context frame t and step k = 1..S, the step-k prediction is scored by a dot product
against the (quantized) feature at frame ``t + offset + k - 1`` and against K distractor frames of
the same utterance; binary cross-entropy pushes the true pair up and the distractors down. Like
:mod:`speechvq.losses`, the loss is a *sum* over targets, to be divided by the number of positives
(``num_targets``) in the training loop, as fairseq's ``sample_size`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_future_distractors(
    lengths: Tensor, max_len: int, num_negatives: int, generator: torch.Generator | None = None
) -> Tensor:
    """K distractor frames for every frame, uniform over the utterance's other valid frames.

    As fairseq's ``sample_negatives``: draw from ``[0, T_b - 1)`` and shift draws at or after the
    frame itself by one, so that a frame is never its own distractor.

    Args:
        lengths: ``[B]`` valid frames per utterance.
        max_len: T.
        num_negatives: K.
        generator: optional RNG.

    Returns:
        ``[B, T, K]`` int64 frame indices within each utterance (padded frames get valid indices
        too; they are never used as targets).
    """
    batch = lengths.numel()
    device = lengths.device
    gen_device = generator.device if generator is not None else device
    draws = torch.rand((batch, max_len, num_negatives), generator=generator, device=gen_device).to(device)
    high = (lengths.to(torch.long) - 1).clamp(min=1)[:, None, None]  # (B, 1, 1)
    sampled = torch.floor(draws * high.to(draws.dtype)).to(torch.long).clamp(max=high - 1)
    frames = torch.arange(max_len, device=device)[None, :, None]  # (1, T, 1)
    return (sampled + (sampled >= frames).to(torch.long)).clamp(max=max(max_len - 1, 0))


def future_prediction_logits(
    predictions: Tensor,
    targets: Tensor,
    distractor_index: Tensor,
    lengths: Tensor,
    offset: int,
) -> Tensor:
    """Dot-product logits of every step prediction against its true future frame and distractors.

    Row order is step-major, then utterance, then frame: for fixed-length input this is the order
    of fairseq's ``cpc_logits`` reshaped to ``[copies, -1]`` and transposed.

    Args:
        predictions: ``[B, T, S, D]`` step predictions of every context frame.
        targets: ``[B, T, D]`` features to predict (the quantized encoder output).
        distractor_index: ``[B, T, K]`` distractor frames of each target frame (see
            :func:`sample_future_distractors`); the target frame t + offset + s uses row t + offset + s.
        lengths: ``[B]`` valid frames.
        offset: frames between a context frame and its first target.

    Returns:
        ``[N, K + 1]`` logits (fp32), the true future frame first; N counts the (frame, step) pairs
        whose target lies inside the utterance.
    """
    batch, frames, steps, _ = predictions.shape
    rows = []
    time = torch.arange(frames, device=predictions.device)
    for step in range(steps):
        shift = offset + step
        if shift >= frames:
            break
        pred = predictions[:, : frames - shift, step].float()  # (B, T-shift, D)
        # Scores of every prediction against every frame of its utterance: (B, T-shift, T).
        scores = torch.bmm(pred, targets.float().transpose(1, 2))
        positive = (time[: frames - shift] + shift)[None, :, None].expand(batch, -1, 1)  # (B, T-shift, 1)
        index = torch.cat([positive, distractor_index[:, shift:]], dim=-1)  # (B, T-shift, 1+K)
        logits = scores.gather(-1, index)
        valid = (time[None, : frames - shift] + shift) < lengths[:, None]  # (B, T-shift)
        rows.append(logits[valid])  # (B, T-shift, 1+K) -> (n_step, 1+K), utterance-major
    if not rows:
        return predictions.new_zeros((0, distractor_index.size(-1) + 1), dtype=torch.float32)
    return torch.cat(rows, dim=0)


def future_prediction_loss(logits: Tensor) -> Tensor:
    """Binary cross-entropy summed over targets: the true frame (column 0) labelled 1, every
    distractor labelled 0 (fp32). A distractor that happens to equal the target keeps label 0, as
    in fairseq."""
    logits = logits.float()
    return F.softplus(-logits[:, 0]).sum() + F.softplus(logits[:, 1:]).sum()


def future_prediction_accuracy(logits: Tensor) -> tuple[Tensor, int]:
    """(number of (prediction, candidate) pairs classified right at threshold 0, number of pairs)."""
    if logits.numel() == 0:
        return torch.zeros((), device=logits.device), 0
    right = (logits[:, 0] > 0).sum() + (logits[:, 1:] < 0).sum()
    return right, logits.numel()
