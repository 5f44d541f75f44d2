"""The package's shape, checked from its source (docs/architecture.md is the map).

Each rule names what broke it: the import edge that closes a cycle, the file or function that
outgrew its limit. The rules are the ones the architecture review asked for (issue 30): the
top-level packages form a DAG with the model at the bottom, no file in ``src/`` over 500 lines,
no function over 80 lines, and one dict-to-dataclass path for every config.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "speechvq"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _top(path: Path) -> str:
    """The top-level package (or module) of ``speechvq`` that ``path`` belongs to."""
    parts = path.relative_to(SRC).parts
    return parts[0].removesuffix(".py") if len(parts) == 1 else parts[0]


def _imported_modules(path: Path) -> list[list[str]]:
    """Every ``speechvq`` module ``path`` imports (at any depth of the file), as name parts below
    ``speechvq``; relative imports resolved."""
    package = list(path.relative_to(SRC).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            found.append(base + (node.module.split(".") if node.module else [node.names[0].name]))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "speechvq":
            found.append(node.module.split(".")[1:] or [node.names[0].name])
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1:] for a in node.names if a.name.startswith("speechvq.")]
    return [m for m in found if m]


def package_graph() -> dict[str, set[str]]:
    """Top-level package -> the top-level packages it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in _sources():
        top = _top(path)
        for module in _imported_modules(path):
            if module[0] != top:
                graph[top].add(module[0])
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_top_level_packages_import_each_other_without_cycles() -> None:
    cycle = _cycle(package_graph())
    assert cycle is None, "import cycle between top-level packages: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("models", {"train", "data", "units", "commands", "interop", "cli"}),
        ("data", {"train", "models", "units", "commands", "interop"}),
        ("units", {"train", "commands"}),
        ("interop", {"train", "commands", "units"}),
        ("train", {"commands"}),
    ],
)
def test_lower_layers_do_not_import_higher_ones(package: str, forbidden: set[str]) -> None:
    assert not package_graph()[package] & forbidden


def test_the_training_loop_imports_no_model() -> None:
    """The loop runs any task (it knows only the protocol in ``train/tasks/base.py``): the command
    builds the model and the task and hands them over."""
    imported = _imported_modules(SRC / "train" / "loop.py")
    assert [m for m in imported if m[:2] == ["train", "tasks"]] == [["train", "tasks", "base"]]
    assert not [m for m in imported if m[0] == "models"]


def test_no_source_file_is_over_the_line_limit() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in _sources()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_the_line_limit() -> None:
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_only_the_config_loader_reads_type_hints() -> None:
    """Dict-to-dataclass conversion is :func:`speechvq.configio.from_dict` and nothing else
    (``configdoc`` reads the hints only to render docs/configuration.md)."""
    readers = sorted(
        str(p.relative_to(SRC)) for p in _sources() if "get_type_hints" in p.read_text(encoding="utf-8")
    )
    assert readers == ["configio.py", "configdoc.py"] or readers == ["configio.py"]


def _config_classes() -> list[tuple[type, dict, str]]:
    """(config class, a mapping with one value of the wrong type, the field's full name)."""
    from speechvq.config import VqWav2VecConfig, Wav2Vec2Config
    from speechvq.models.ctc import CtcConfig
    from speechvq.train.config import PretrainConfig
    from speechvq.train.finetune import FinetuneConfig
    from speechvq.units.bert import UnitBertConfig
    from speechvq.units.ctc import UnitBertCtcConfig

    return [
        (Wav2Vec2Config, {"context": {"num_layers": "twelve"}}, "context.num_layers"),
        (VqWav2VecConfig, {"kmeans": {"codebook_size": "many"}}, "kmeans.codebook_size"),
        (CtcConfig, {"mask": {"mask_length": "ten"}}, "mask.mask_length"),
        (UnitBertConfig, {"num_layers": "twelve"}, "num_layers"),
        (UnitBertCtcConfig, {"freeze_updates": "soon"}, "freeze_updates"),
        (PretrainConfig, {"optim": {"lr": "fast"}}, "optim.lr"),
        (FinetuneConfig, {"mask": {"mask_prob": "half"}}, "mask.mask_prob"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_every_config_loads_through_the_one_loader(case: int) -> None:
    """Model configs, run configs and unit configs alike: the same typed checks, the same message
    naming the field in full, the same refusal of unknown keys."""
    from speechvq.configio import from_dict
    from speechvq.errors import UserInputError

    cls, bad, name = _config_classes()[case]
    load = getattr(cls, "from_dict", None) or (lambda data: from_dict(cls, data))
    with pytest.raises(UserInputError, match=f"`{name}` must be of type"):
        load(bad)
    with pytest.raises(UserInputError, match=r"unknown field\(s\) \['no_such_field'\]"):
        load({"no_such_field": 1})
