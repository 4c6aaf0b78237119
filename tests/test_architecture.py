"""The house's shape, checked from the source (ast), so it stays true as code moves.

- no import cycle between swarmbus modules;
- only the JetStream layer (``swarmbus/_jetstream/``) and at most three other modules
  import ``nats``;
- no class over 500 lines, no function over 100 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "swarmbus"
JETSTREAM_LAYER = "swarmbus._jetstream"
MAX_OTHER_NATS_IMPORTERS = 3
MAX_CLASS_LINES = 500
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), str(path))
    return modules


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every module ``name`` imports (at any depth: function-local imports count)."""
    found: set[str] = set()
    package = name if name in PACKAGES else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


PACKAGES = {
    ".".join(p.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("*") if p.is_dir()
} | {"swarmbus"}


def _internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in MODULES.items():
        graph[name] = {m for m in _imports(name, tree) if m in MODULES and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    # The package's __init__ re-exports everything: a module importing "swarmbus" itself
    # (e.g. for __version__) is not a cycle through the modules it re-exports.
    graph = _internal_graph()
    graph["swarmbus"] = set()
    assert _cycle(graph) is None


def test_only_the_jetstream_layer_and_three_more_modules_import_nats() -> None:
    importers = sorted(
        name
        for name, tree in MODULES.items()
        if not (name == JETSTREAM_LAYER or name.startswith(JETSTREAM_LAYER + "."))
        and any(m == "nats" or m.startswith("nats.") for m in _imports(name, tree))
    )
    assert len(importers) <= MAX_OTHER_NATS_IMPORTERS, importers


def _too_long(kind: type[ast.AST] | tuple[type[ast.AST], ...], limit: int) -> list[str]:
    out = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, kind):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]
                if lines > limit:
                    out.append(f"{name}.{node.name} ({lines} lines)")  # type: ignore[attr-defined]
    return sorted(out)


def test_no_class_over_500_lines() -> None:
    assert _too_long(ast.ClassDef, MAX_CLASS_LINES) == []


def test_no_function_over_100_lines() -> None:
    assert _too_long((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES) == []


@pytest.mark.parametrize("limit", [MAX_CLASS_LINES, MAX_FUNCTION_LINES])
def test_the_length_checks_see_this_file(limit: int) -> None:
    assert "test_architecture" not in " ".join(_too_long(ast.ClassDef, limit))
