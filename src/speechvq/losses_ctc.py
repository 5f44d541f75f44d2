"""CTC loss as a pure function.

Normalisation, documented once: ``reduction="sum"`` (the default) returns the negative
log-likelihood summed over the utterances of the batch; the training loop divides it by the
number of utterances, summed over data-parallel ranks and accumulation steps (fairseq's
``sentence_avg: true``, used by every wav2vec 2.0 fine-tuning config). ``reduction="mean"`` is
torch's (and transformers' ``ctc_loss_reduction="mean"``): each utterance's loss divided by its
target length, then averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ctc_loss(
    logits: Tensor,
    lengths: Tensor,
    targets: Tensor,
    target_lengths: Tensor,
    *,
    blank_id: int = 0,
    reduction: str = "sum",
) -> Tensor:
    """Connectionist temporal classification loss (Graves et al., 2006).

    ``log_softmax`` and the loss run in fp32 whatever the autocast state, because CTC's forward
    recursion underflows in half precision (a known source of NaN in fp16 fine-tuning).
    Utterances that cannot be aligned (more targets than frames) get an infinite loss, which is
    zeroed (``zero_infinity=True``) so that they contribute no gradient instead of NaN.

    Args:
        logits: ``[B, T, V]`` unnormalised frame scores.
        lengths: ``[B]`` valid frames.
        targets: ``[B, L]`` target ids, padded with any value past ``target_lengths``; must not
            contain ``blank_id``.
        target_lengths: ``[B]`` valid targets.
        blank_id: index of the blank.
        reduction: ``"sum"`` or ``"mean"`` (see the module docstring).

    Returns:
        Scalar fp32 loss.

    Raises:
        ValueError: for an unknown ``reduction`` or mismatched batch sizes.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean', but is {reduction!r} instead.")
    if not logits.size(0) == lengths.size(0) == targets.size(0) == target_lengths.size(0):
        raise ValueError(
            f"`logits`, `lengths`, `targets` and `target_lengths` must share the batch size, but have "
            f"{logits.size(0)}, {lengths.size(0)}, {targets.size(0)}, {target_lengths.size(0)} instead."
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (B, T, V) -> (T, B, V)
        # cuDNN's CTC has extra constraints (and differs numerically); the native kernel is used
        with torch.backends.cudnn.flags(enabled=False):
            return F.ctc_loss(
                log_probs,
                targets.long(),
                lengths.long(),
                target_lengths.long(),
                blank=blank_id,
                reduction=reduction,
                zero_infinity=True,
            )


def pad_targets(ids: list[list[int]], pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """Batch target id lists for :func:`ctc_loss`.

    Args:
        ids: one list of target ids per utterance (e.g. ``Vocabulary.encode``).
        pad_value: filler past each length (never read by the loss).

    Returns:
        ``targets [B, L]`` (int64, L = longest list) and ``target_lengths [B]``.
    """
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.long)
    targets = torch.full((len(ids), int(lengths.max()) if ids else 0), pad_value, dtype=torch.long)
    for row, t in enumerate(ids):
        targets[row, : len(t)] = torch.tensor(t, dtype=torch.long)
    return targets, lengths
