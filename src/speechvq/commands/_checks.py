"""Checks of command-line values shared by the commands, each failing with one line naming the option."""

from __future__ import annotations

import math
from typing import Any

from speechvq.errors import UserInputError


def check_device(text: str) -> Any:
    """``torch.device(text)``, refusing with one line a name torch does not know or a device that is
    not available here (``cuda`` on a machine without a GPU).

    Raises:
        UserInputError: naming ``--device`` and the problem.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(
            f"--device must be a torch device such as cpu or cuda:0, but is {text!r} instead."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {text}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"--device must be cpu, cuda[:N] or mps, but is {text!r} instead.")
    elif device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise UserInputError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


def check_at_least(option: str, value: int, low: int = 1) -> None:
    """``value >= low``, or one line naming ``option``."""
    if value < low:
        raise UserInputError(f"{option} must be >= {low}, but is {value} instead.")


def check_finite(option: str, values: list[float]) -> None:
    """Every value finite, or one line naming ``option``."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise UserInputError(f"{option} must be finite numbers, but holds {bad[0]} instead.")
