"""Progress bars for the commands that walk a corpus (tqdm, on stderr).

Shown where stderr is a terminal (``auto``), always, or never: the ``speechvq --progress`` option,
or ``SPEECHVQ_PROGRESS``. Training has its own bar (``train.progress_bar``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

MODES = ("auto", "always", "never")
_mode: str | None = None


@contextlib.contextmanager
def mode_set_to(new: str | None) -> Iterator[None]:
    """Within the block, bars are shown as ``new`` says: ``auto`` (where stderr is a terminal),
    ``always`` or ``never``; None leaves the mode as it is."""
    global _mode
    if new is not None and new not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, but is {new!r} instead.")
    previous = _mode
    _mode = new if new is not None else _mode
    try:
        yield
    finally:
        _mode = previous


def mode() -> str:
    """The mode set by :func:`mode_set_to`, else ``SPEECHVQ_PROGRESS``, else ``auto``."""
    if _mode is not None:
        return _mode
    env = os.environ.get("SPEECHVQ_PROGRESS", "auto").strip().lower()
    return env if env in MODES else "auto"


def bar(
    iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "utt"
) -> Any:
    """A tqdm bar with its rate in ``unit``/s (``disable=None``: tqdm's own terminal check)."""
    disable = {"always": False, "never": True}.get(mode())
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1
    )


def track(iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "utt") -> Iterator[T]:
    """``iterable`` with a :func:`bar`, closed at the end."""
    with bar(iterable, total=total, desc=desc, unit=unit) as progress:
        yield from progress


def set_audio_rate(progress: Any, audio_s: float) -> None:
    """Show the audio done so far and its speed relative to real time in the bar's postfix."""
    elapsed = progress.format_dict.get("elapsed") or 0.0
    speed = f", {audio_s / elapsed:.1f}x real time" if elapsed > 0 else ""
    progress.set_postfix_str(f"{duration(audio_s)} audio{speed}", refresh=False)


def duration(seconds: float) -> str:
    """``2.50 h``, ``3.2 min`` or ``12.3 s``."""
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
