"""Metric records: one JSON line per record in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
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


def read_metrics(exp_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``exp_dir/metrics.jsonl``; for steps logged twice (a resumed run that
    repeats steps) the later record wins."""
    path = Path(exp_dir) / "metrics.jsonl"
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_key[(record["split"], int(record["step"]))] = record
    return sorted(by_key.values(), key=lambda r: (r["split"], r["step"]))
