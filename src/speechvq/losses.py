"""Loss terms as pure functions.

Normalisation, documented once: every term here is a *sum over masked targets* (the diversity and
feature penalties are multiplied by the number of targets N, as fairseq and transformers do), so
the training loop divides the total by N summed over data-parallel ranks and accumulation steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_logits(
    predictions: Tensor,
    candidates: Tensor,
    target_pos: Tensor,
    distractor_pos: Tensor,
    logit_temp: float,
    eps: float = 1e-8,
) -> Tensor:
    """Cosine-similarity logits of each prediction against its target and K distractors (eq. 3),
    computed in fp32, divided by kappa. A distractor equal to the target (possible when few
    codewords are in use) would make the task ill-posed, so its logit is set to -inf.

    The targets and distractors are given as rows of ``candidates``: each vector is normalised once
    (as ``torch.cosine_similarity`` does, norms clamped at ``eps``), every prediction is scored
    against every candidate with one matmul (``[N, M]``, with M about N since the distractors are
    masked frames), and the K + 1 logits are gathered from that. That equals cosine similarity over
    an ``[N, K + 1, F]`` candidate tensor to rounding, whose elementwise passes were 17% of a SMALL
    training step.

    Args:
        predictions: ``[N, F]`` context outputs projected to the final dim.
        candidates: ``[M, F]`` projected quantized vectors the targets and distractors are among.
        target_pos: ``[N]`` row of each prediction's target in ``candidates``.
        distractor_pos: ``[N, K]`` rows of its distractors in ``candidates``.
        logit_temp: kappa.
        eps: lower bound of the norms.

    Returns:
        ``[N, K + 1]`` fp32 logits, the target at index 0; a distractor whose vector equals the
        target's gets -inf.
    """
    p = predictions.float()
    c = candidates.float()
    p = p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp(min=eps)
    c = c / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp(min=eps)
    with torch.autocast(device_type=p.device.type, enabled=False):  # autocast would take bf16/fp16
        scores = p @ c.t()  # (N, F) @ (F, M) -> (N, M)
    index = torch.cat([target_pos[:, None], distractor_pos], dim=1)  # (N, 1+K)
    logits = scores.gather(1, index) / logit_temp
    if distractor_pos.numel():
        # equal vectors, not equal rows: two frames with the same codes give the same target
        _, vector_id = torch.unique(candidates.detach(), dim=0, return_inverse=True)  # (M,)
        same = vector_id[distractor_pos] == vector_id[target_pos][:, None]  # (N, K)
        if bool(same.any()):
            logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same, float("-inf"))], dim=1)
    return logits


def contrastive_loss(logits: Tensor) -> Tensor:
    """InfoNCE summed over targets: cross entropy with the target at index 0 (fp32)."""
    zeros = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), zeros, reduction="sum")


def contrastive_accuracy(logits: Tensor) -> tuple[Tensor, int]:
    """(number of targets ranked strictly first, number of targets).

    A target tied with its best distractor counts as wrong, and so does a row without
    distractors. fairseq's rule (argmax at the target, argmin elsewhere) only catches rows whose
    logits are *all* equal: when the target ties with the best distractors and some other logit is
    lower, argmax returns the target (the first of the tied entries) and the row counts as
    correct. A model collapsed to one prediction for every frame produced such ties under bf16
    autocast: the run logged accuracy 0.65 with the loss at chance, and on a batch from its
    checkpoint fairseq's rule gives 0.61 where this one gives 0.
    """
    if logits.size(1) < 2:
        return torch.zeros((), device=logits.device, dtype=torch.long), logits.size(0)
    return (logits[:, 0] > logits[:, 1:].amax(dim=-1)).sum(), logits.size(0)


def diversity_loss(prob_perplexity: Tensor, num_codes: int) -> Tensor:
    """(G V - perplexity) / (G V): 0 when all codewords are used equally (eq. 4)."""
    return (num_codes - prob_perplexity) / num_codes


def feature_penalty(
    features: Tensor, padding_mask: Tensor | None, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Mean squared activation of the feature encoder output over non-padded frames (fp32).

    ``reduce`` sums the numerator and the count over data-parallel processes (with gradient), so
    that the mean is over the global batch rather than this process's share of it.
    """
    squares = features.float().pow(2)
    if padding_mask is None and reduce is None:
        return squares.mean()
    if padding_mask is None:
        valid = torch.ones(squares.shape[:-1], dtype=squares.dtype, device=squares.device)[..., None]
    else:
        valid = (~padding_mask).to(squares.dtype)[..., None]
    total, count = (squares * valid).sum(), valid.sum() * squares.size(-1)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total / count.clamp(min=1.0)


@dataclass
class LossBreakdown:
    """Weighted loss terms, each a sum over the ``num_targets`` masked targets."""

    total: Tensor
    contrastive: Tensor
    diversity: Tensor
    """alpha * N * diversity_loss."""
    feature_penalty: Tensor
    """beta * N * feature_penalty."""
    num_targets: int
