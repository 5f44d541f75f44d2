"""Metric records: one JSON line per record in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speechvq.files import read_bytes, writing

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Append records ``{"split": "train"|"valid", "step": n, ...}`` to ``metrics.jsonl``.

    Args:
        exp_dir: experiment directory.
        tensorboard: also write TensorBoard events to ``exp_dir/tensorboard`` (skipped with a
            warning if ``tensorboard`` is not installed).
    """

    def __init__(self, exp_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.path = Path(exp_dir) / "metrics.jsonl"
        with writing(self.path):
            torn = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            if torn:  # a kill mid-record: end that line, so the next record is not glued to it
                self._file.write("\n")
        self._writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed; writing metrics.jsonl only")
            else:
                self._writer = SummaryWriter(str(Path(exp_dir) / "tensorboard"))

    def log(self, split: str, step: int, values: Mapping[str, float]) -> None:
        """Write one record (non-finite values are written as null)."""
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items() if k != "step"}
        with writing(self.path):
            self._file.write(json.dumps({"split": split, "step": step, **clean}) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in clean.items():
                if value is not None:
                    self._writer.add_scalar(f"{split}/{key}", value, step)
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_metrics(exp_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``exp_dir/metrics.jsonl``; for steps logged twice (a resumed run that
    repeats steps) the later record wins. Lines that are not records (a line torn by a kill, a
    damaged byte) are skipped and counted in a warning.

    Raises:
        UserInputError: the file is missing, not a regular file, or unreadable.
    """
    path = Path(exp_dir) / "metrics.jsonl"
    data = read_bytes(path, "metrics file")
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    bad: list[int] = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            key = (str(record["split"]), int(record["step"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            bad.append(lineno)
            continue
        by_key[key] = record
    if bad:
        logger.warning(
            "%s: skipped %d line(s) that are not metric records (line %d first)", path, len(bad), bad[0]
        )
    return sorted(by_key.values(), key=lambda r: (r["split"], r["step"]))
