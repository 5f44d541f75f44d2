"""docs/configuration.md is generated from the config dataclasses and kept in sync."""

from __future__ import annotations

from pathlib import Path

from speechvq.configdoc import field_docs, render, undocumented

DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def test_configuration_reference_is_in_sync_with_the_code():
    assert DOC.read_text() == render(), "run: python -m speechvq.configdoc > docs/configuration.md"


def test_every_config_field_has_a_docstring():
    assert undocumented() == []


def test_field_docs_reads_the_docstring_under_each_field():
    from dataclasses import dataclass

    @dataclass
    class Example:
        a: int = 1
        """The a."""
        b: int = 2

    assert field_docs(Example) == {"a": "The a."}
