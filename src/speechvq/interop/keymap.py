"""Template key maps: rename state-dict keys between speechvq and other toolkits.

A table is a list of ``(source_prefix, target_prefix)`` templates in which ``{i}`` stands for a
layer index; the first template whose prefix matches a key renames that prefix. Conversion lives in
such tables, never in branches of the model code.
"""

from __future__ import annotations

import re

KeyTable = list[tuple[str, str]]


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def rename_keys(keys: list[str], table: KeyTable, *, reverse: bool = False) -> dict[str, str]:
    """Map each key through the first matching template of ``table`` (left -> right, or right ->
    left with ``reverse``).

    Raises:
        KeyError: for a key that no template matches.
    """
    pairs = [(b, a) if reverse else (a, b) for a, b in table]
    compiled = [(_compile(src), dst) for src, dst in pairs]
    out = {}
    for key in keys:
        for pattern, dst in compiled:
            match = pattern.match(key)
            if match:
                prefix = dst.replace("{i}", match.group("i")) if "i" in pattern.groupindex else dst
                out[key] = prefix + key[match.end() :]
                break
        else:
            raise KeyError(f"no conversion rule for parameter {key!r}")
    return out
