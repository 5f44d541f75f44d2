"""One run per experiment directory: an ``flock``-ed lock file holding the owner's pid.

Two runs writing the same ``exp_dir`` would interleave checkpoints, ``best.json`` and metrics.
:func:`experiment_lock` takes ``exp_dir/.lock`` with ``fcntl.flock(LOCK_EX | LOCK_NB)`` before the
run writes anything and holds it until the run ends. A second run is refused with one line naming
the holder's pid. The kernel releases an ``flock`` when its process dies (even by SIGKILL), so a
lock file left by a dead run is simply taken over; its old pid is logged. The lock is re-entrant
within a process (the commands take it before building their task, the loop takes it again).

Only the main process of a multi-process run locks (``RANK`` 0, or no ``RANK``): the other ranks
belong to the same run. Where the file system does not support ``flock`` (some network file
systems), a warning is logged and the run goes on unlocked.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from speechvq.errors import UserInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, runs are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
"""The lock file inside an experiment directory."""

_held: dict[Path, list[int]] = {}  # resolved exp dir -> [fd, depth] of the locks this process holds


class ExperimentLockedError(UserInputError):
    """Another live run holds the experiment directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def acquire(exp_dir: str | os.PathLike[str]) -> Path | None:
    """Take ``exp_dir``'s lock (creating the directory); returns the lock file, or None when not locked.

    Raises:
        ExperimentLockedError: another live process holds the lock; the message names its pid.
        UserInputError: ``exp_dir`` cannot be created or the lock file cannot be opened.
    """
    if fcntl is None or not _is_main_process():
        return None
    root = Path(exp_dir)
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{root}: the experiment directory must be a directory, but is a file instead.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"{root}: cannot create the experiment directory ({err.strerror})") from None
    key = root.resolve()
    if key in _held:
        _held[key][1] += 1
        return key / LOCK_NAME
    path = key / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserInputError(f"{path}: cannot open the experiment lock ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_pid(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"pid {holder}" if holder is not None else "another process"
            raise ExperimentLockedError(
                f"{root}: another run ({who}) is using this experiment directory (lock {path}); "
                "wait for it to end, or stop it, before starting another"
            ) from None
        logger.warning("%s: cannot lock (%s); running without the one-run-per-directory guard", path, err)
        return None
    previous = _read_pid(fd)
    if previous is not None and previous != os.getpid():
        state = "no longer running" if not _pid_alive(previous) else "not holding it"
        logger.info("%s: taking over the lock left by pid %d (%s)", path, previous, state)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1]
    return path


def release(exp_dir: str | os.PathLike[str]) -> None:
    """Release one level of this process's lock on ``exp_dir`` (the file stays; the lock goes)."""
    key = Path(exp_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor releases the flock


@contextmanager
def experiment_lock(exp_dir: str | os.PathLike[str]) -> Iterator[Path | None]:
    """Hold ``exp_dir``'s lock for the block (see the module docstring)."""
    path = acquire(exp_dir)
    try:
        yield path
    finally:
        if path is not None:
            release(exp_dir)
