"""Stopping a training run cleanly on SIGTERM (schedulers: SLURM, Kubernetes) or SIGINT (Ctrl-C).

The first signal only sets a flag: the loop finishes the update in progress, writes a checkpoint
and returns, and the command prints how to resume. A second signal stops at once: SIGINT raises
``KeyboardInterrupt`` there and then, SIGTERM ends the process as its default action does. The
handlers are installed only in the main thread of the main interpreter (``signal`` allows no
other) and restored when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Which signal asked the run to stop (None while none has)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signum
            return
        # a second signal: stop now, as if no handler had been installed
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def install(self) -> None:
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A :class:`StopRequest` that SIGTERM and SIGINT set within the block (a no-op outside the
    main thread, where the flag simply never gets set)."""
    request = StopRequest()
    if threading.current_thread() is threading.main_thread():
        request.install()
    try:
        yield request
    finally:
        request.restore()


def ignore_in_worker(_: int) -> None:
    """``worker_init_fn`` of DataLoader workers: they ignore SIGINT and SIGTERM, which a terminal or
    a scheduler sends to the whole process group, so that the main process can finish its update
    with them (it ends them itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StoppedBySignal(Exception):
    """A training command stopped on a signal after writing a checkpoint; the CLI prints the
    message with the command that resumes the run and exits with ``128 + signal``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
