"""Bounds on what a config may describe, and the checks that enforce them."""

from __future__ import annotations

from typing import Any

MAX_SIZE = 1 << 20
"""Largest width, kernel, stride or codebook size a config may give (configs read from checkpoints
are untrusted: a crafted one must not make the builder allocate without bound)."""
MAX_LAYERS = 1024
"""Most conv layers or Transformer blocks a config may give."""
MAX_PARAMETERS = 10**10
"""Most parameters a wav2vec 2.0 / CTC config may describe (the largest released model has 2e9)."""


def _check_sizes(obj: Any, names: tuple[str, ...], low: int = 1, high: int = MAX_SIZE) -> None:
    """Each named field an int in [low, high]; ValueError in the house template otherwise."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"`{name}` must be an integer in [{low}, {high}], but is {value!r} instead.")


def _check_probabilities(obj: Any, names: tuple[str, ...]) -> None:
    """Each named field a number in [0, 1]."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be a number in [0, 1], but is {value!r} instead.")
