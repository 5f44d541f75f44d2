"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch

from local_http import server  # noqa: F401  (a fixture for the download tests)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def waves() -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of three utterances of different lengths: ([3, 16000], [3])."""
    g = torch.Generator().manual_seed(1234)
    lengths = torch.tensor([16000, 11000, 7000])
    x = torch.randn(3, 16000, generator=g)
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0.0
    return x, lengths
