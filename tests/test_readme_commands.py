"""README's command table names every command of the CLI, and only those."""

from __future__ import annotations

import re
from pathlib import Path

from speechvq.cli import COMMANDS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_command_table_lists_every_cli_command() -> None:
    table = README.read_text(encoding="utf-8").split("## What is in it", 1)[1].split("\n\n", 2)[1]
    listed = set(
        re.findall(r"`([a-z][a-z0-9-]*)`", " ".join(line.split("|")[2] for line in table.splitlines()[2:]))
    )
    assert set(COMMANDS) - listed == set(), "commands missing from README's table"
    assert listed <= set(COMMANDS), "README names commands the CLI does not have"
