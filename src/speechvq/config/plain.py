"""Config dataclasses as plain (JSON/YAML) values; the way back is :func:`speechvq.configio.from_dict`."""

from __future__ import annotations

from typing import Any


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
