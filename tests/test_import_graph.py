"""The package's shape, checked on its source: no import circles, the LoRA core standing alone, and no
private names reaching across modules. Imports inside functions count too: a lazy import that dodges a
circle is still a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import loratune

SRC = Path(loratune.__file__).parent
PACKAGE = "loratune"
CORE = "loratune.core"


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's __init__)."""
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imports_of(name: str, path: Path, is_package: bool, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of a loratune module in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            found.append((module, names, node.lineno))
            found += [(f"{module}.{n}", [], node.lineno) for n in names if f"{module}.{n}" in known]
    return [(module, names, line) for module, names, line in found if module in known]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between loratune modules, and the private names imported across modules.

    Importing `a.b.c` first runs the package `a.b`'s `__init__`, so an import from outside `a.b` also
    depends on `a.b` (an import from inside it does not: that package is already being imported).
    """
    modules = module_files()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, (path, is_package) in modules.items():
        for module, names, line in imports_of(name, path, is_package, set(modules)):
            if module == name:
                continue
            graph[name].add(module)
            parts = module.split(".")
            for i in range(2, len(parts)):
                package = ".".join(parts[:i])
                if package in graph and not (name == package or name.startswith(package + ".")):
                    graph[name].add(package)
            private += [f"{name}:{line} imports {n} from {module}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    return graph, private


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_walk_sees_the_whole_package():
    graph, _ = import_graph()
    assert {"loratune.core.adapters", "loratune.train.loop", "loratune.cli"} <= set(graph)
    assert "loratune.core.layers" in graph["loratune.core.adapters"]
    assert "loratune.train" in graph["loratune.cli"]  # a lazy import inside a function counts
    assert "loratune.train" in graph["loratune.train.memory"] or "loratune.train.step" in graph["loratune.train.memory"]


def test_the_circle_finder_finds_a_circle_through_a_package_init():
    graph = {"a": {"p.b"}, "p": {"p.c"}, "p.b": set(), "p.c": {"a"}}
    graph["a"].add("p")  # as import_graph adds it for `from p.b import x` outside package p
    assert circles(graph) == [["a", "p", "p.c"]]


def test_no_import_circles():
    graph, _ = import_graph()
    assert circles(graph) == []


def test_the_core_imports_nothing_from_the_application():
    graph, _ = import_graph()
    outside = sorted(f"{name} -> {other}" for name, targets in graph.items() if name.startswith(CORE + ".")
                     or name == CORE for other in targets if not (other == CORE or other.startswith(CORE + ".")))
    assert outside == []


def test_no_private_names_are_imported_across_modules():
    _, private = import_graph()
    assert private == []
