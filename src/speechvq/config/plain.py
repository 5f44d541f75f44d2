"""Config dataclasses as plain (JSON/YAML) values; the way back is :func:`speechvq.configio.from_dict`."""

from __future__ import annotations

from typing import Any


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
