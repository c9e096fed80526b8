"""The project's modules import each other without a cycle: a cycle makes import order matter and
invites imports hidden inside functions to dodge it, so it is caught here, from the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("adaptation", "service")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names (for `from a import b`, `a` and `a.b`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(tree: ast.Module, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The module-level import statements, and with `in_functions` those inside any function
    too (a late import there still closes a cycle, only later). Imports under `if
    TYPE_CHECKING:` never run, so they count in neither."""
    nodes: list[ast.AST] = list(tree.body)
    if in_functions:
        functions = (ast.FunctionDef, ast.AsyncFunctionDef)
        nodes += [n for f in ast.walk(tree) if isinstance(f, functions) for n in ast.walk(f)]
    return [n for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)]


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """Each module of the packages -> the modules of the packages it imports."""
    files = {
        _module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in _imports(tree, in_functions):
            names = _imported(node, module, path.name == "__init__.py")
            edges.update(n for n in names if n in files and n != module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_knows_the_service() -> None:
    graph = import_graph()
    assert "service.backends" in graph["service.worker"]
    assert "service.backends.mac" in graph["service.engine"]


def test_no_import_cycle_among_the_packages_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_no_cycle_hidden_by_an_import_inside_a_function() -> None:
    cycle = find_cycle(import_graph(in_functions=True))
    assert cycle is None, f"import cycle through a late import: {' -> '.join(cycle or [])}"
