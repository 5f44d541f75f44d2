"""Inverted dropout with a faster CPU sampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speechvq.models.common import Dropout

_DRAWS = 2**31
"""Values of each int32 half of a :func:`dropout` draw: uniform over [0, 2^31)."""

_HALVES_31_BITS = 0x7FFFFFFF7FFFFFFF
"""Clears bit 31 of an int64 draw (bit 63 is already 0), leaving two uniform 31-bit halves."""


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, distributed as ``F.dropout``: each element is kept with probability
    1 - p and scaled by 1 / (1 - p).

    On the CPU the keep mask comes from int64 ``random_()`` draws, uniform over [0, 2^63), each
    split into two int32 halves of 31 random bits (bit 31 cleared): an element is kept where its
    half is at least ``round(p * 2^31)`` (the keep probability is exact to 2^-32), and the mask is
    applied by one multiply. Forward + backward 1.3-1.6x faster than ``F.dropout``, whose
    ``bernoulli_`` draws were 9% of a SMALL training step. torch's CPU generator is serial, and an
    int64 draw costs 1.2x an int32 one for twice the bits: the draws for a ``[706, 768]`` mask
    take 0.9 ms against 1.5 ms as int32. Elsewhere (CUDA's fused kernel) it is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    n = x.numel()
    draws = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_()  # [0, 2^63)
    halves = draws.bitwise_and_(_HALVES_31_BITS).view(torch.int32)[:n]  # 2 per draw, [0, 2^31)
    keep = (halves >= round(p * _DRAWS)).view(x.shape)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class FastDropout(Dropout):
    """:class:`~speechvq.models.common.Dropout` through :func:`dropout` (the same distribution,
    faster on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
