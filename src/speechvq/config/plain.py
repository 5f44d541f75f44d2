"""Conversion between config dataclasses and plain (JSON/YAML) values."""

from __future__ import annotations

import dataclasses
from typing import Any


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"config for {cls.__name__} must be a mapping, but is {type(data).__name__} instead.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TypeError(f"unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _SUBCONFIGS.get((cls.__name__, name))
        kwargs[name] = _from_plain(sub, value) if sub is not None else value
    return cls(**kwargs)


_SUBCONFIGS: dict[tuple[str, str], type] = {}
"""(config class name, field name) -> the config class of that nested field; filled by the
modules that define the configs (:mod:`.model`, :mod:`.vq_wav2vec`)."""
