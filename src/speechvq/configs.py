"""The run configs shipped with speechvq, selectable by name (``--config pretrain_small_cpu``).

They live in the repository's ``conf/`` and are installed into the wheel as ``speechvq/conf/``
(``pyproject.toml``); in a source checkout (editable install) the repository's ``conf/`` is read.
"""

from __future__ import annotations

from pathlib import Path

from speechvq.errors import UserInputError

_PACKAGE_CONF = Path(__file__).resolve().parent / "conf"
"""Where the wheel installs the configs."""
_CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"
"""The repository's ``conf/``, for a source checkout (``src/speechvq/configs.py`` -> ``conf/``)."""


def config_dir() -> Path | None:
    """The directory of the shipped configs, or None if neither location has any."""
    for directory in (_PACKAGE_CONF, _CHECKOUT_CONF):
        if directory.is_dir() and any(directory.glob("*.yaml")):
            return directory
    return None


def bundled_configs() -> dict[str, Path]:
    """Shipped config name (file stem) -> path."""
    directory = config_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))} if directory is not None else {}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when it is a file, else the shipped config of that
    name (with or without ``.yaml``).

    Raises:
        UserInputError: when it is neither, naming the shipped configs.
    """
    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        return path  # a file (or something the reader will refuse by name, e.g. a FIFO)
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        shipped = bundled_configs().get(path.stem if path.suffix else path.name)
        if shipped is not None:
            return shipped
    if path.exists():
        raise UserInputError(f"{path}: the config must be a YAML file, but this is a directory")
    names = ", ".join(bundled_configs()) or "none found"
    raise UserInputError(
        f"{path}: config file not found, and no shipped config has this name (shipped: {names})"
    )
