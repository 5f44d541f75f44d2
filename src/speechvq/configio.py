"""Config files into typed dataclasses: one loader for every config of the package.

:func:`from_dict` builds a config dataclass from a plain mapping (parsed YAML or JSON) and checks
every value against its field's type hint, with one-line errors naming the field: unknown keys,
wrong types, values outside a ``Literal``, and the checks of the class's own ``__post_init__``.
:func:`parse_yaml` reads the YAML text that such mappings come from, refusing documents that
expand to absurd sizes; :func:`parse_override` reads one ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from speechvq.errors import UserInputError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from a plain mapping, type-checking and converting every value.

    Conversions undo what YAML and JSON lose: an int for a float field becomes a float, a string
    such as ``"5e-4"`` (YAML 1.1 reads it as one) a float, a list a tuple. A field whose type is
    itself a dataclass is built by the same rules from its mapping (null: all its defaults).

    Args:
        cls: the dataclass.
        data: its fields by name; None for all defaults.
        where: the dotted name of ``data`` in its document, for messages (``model``,
            ``data.train``); "" for the document itself.

    Raises:
        UserInputError: ``data`` is not a mapping, has an unknown key or a value of the wrong
            type, or ``cls`` rejects a value (its ``ValueError``/``TypeError``, with the field
            name qualified by ``where``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserInputError(f"`{where or cls.__name__}` must be a mapping, but is {data!r} instead.")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        place = f" in `{where}`" if where else f" for {cls.__name__}"
        raise UserInputError(f"unknown field(s) {unknown}{place}; known: {sorted(names)}")
    hints = get_type_hints(cls)
    values = {k: _coerce(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**values)
    except UserInputError:
        raise
    except (ValueError, TypeError) as err:
        raise UserInputError(_qualified(str(err), where, names)) from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _qualified(message: str, where: str, names: set[str]) -> str:
    """A class's own error (``"`mask_prob` must be ..."``) with the field named in full
    (``"`mask.mask_prob` must be ..."``)."""
    found = re.match(r"`([A-Za-z_][A-Za-z0-9_]*)`", message)
    if where and found and found.group(1) in names:
        return f"`{where}.{found.group(1)}`{message[found.end() :]}"
    return f"`{where}`: {message}" if where else message


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against the type ``hint`` (after YAML parsing) and convert tuples/floats."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, name)
    if origin is Literal:
        if value not in get_args(hint):
            raise UserInputError(f"`{name}` must be one of {list(get_args(hint))}, but is {value!r} instead.")
        return value
    if origin is None and hint in (int, float, bool, str):
        return _scalar(value, hint, name)
    args = get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(value, rest[0], name)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"`{name}` must be a list, but is {value!r} instead.")
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserInputError(f"`{name}` must be a list of {len(args)} values, but is {value!r} instead.")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserInputError(f"`{name}` must be a mapping, but is {value!r} instead.")
        return value
    return value


def _scalar(value: Any, hint: type, name: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserInputError(
            f"`{name}` must be of type {hint.__name__}, but is {value!r} ({type(value).__name__}) instead."
        )
    return value


MAX_YAML_NODES = 100_000
"""Largest YAML document accepted, in nodes with every alias expanded (a "billion laughs" document
of a few lines would otherwise expand to billions of values when the config is copied)."""


def parse_yaml(text: str, where: str, *, allow_tags: bool = True) -> Any:
    """``yaml.safe_load(text)``, with one-line errors naming ``where`` (and the line).

    Args:
        text: the YAML text.
        where: what it is, for errors (``c.yaml``, ``--set optim.lr=...``).
        allow_tags: False refuses every explicit tag (``!!float``, ``!!python/...``), for values
            given on the command line: a plain value never needs one.

    Raises:
        UserInputError: invalid YAML, a tag where none is allowed, or a document that expands to
            more than :data:`MAX_YAML_NODES` nodes.
    """
    try:
        if not allow_tags:
            for token in yaml.scan(text):
                if isinstance(token, yaml.TagToken):
                    raise UserInputError(
                        f"{where}: YAML tags such as {_tag_text(token)!r} are not allowed here; write a plain value"
                    )
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UserInputError(
                f"{where}: the YAML document expands to more than {MAX_YAML_NODES} values "
                "(aliases repeating aliases); refused"
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None and not where.startswith("--set") else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserInputError(f"{where}{line}: invalid YAML: {problem}") from None
    except RecursionError:
        raise UserInputError(f"{where}: the YAML document is nested too deeply") from None


def _tag_text(token: Any) -> str:
    handle, suffix = token.value
    return f"{handle or ''}{suffix}"


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes of a composed YAML graph with every alias expanded (memoised, so it never expands)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts once (safe_load refuses those anyway)
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(_expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        else:
            size = 1
        memo[key] = min(size, MAX_YAML_NODES + 1)
    return memo[key]


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=5e-4"`` -> ``("optim.lr", 0.0005)``.

    The value is parsed as YAML (``yaml.safe_load``); tags (``!!python/...``, ``!!float``) are
    refused, and so is invalid YAML, each with one line naming the override.
    """
    if "=" not in text:
        raise UserInputError(f"--set must be KEY=VALUE (e.g. optim.lr=5e-4), but is {text!r} instead.")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"--set {text}", allow_tags=False) if raw.strip() else None
    return key.strip(), value
