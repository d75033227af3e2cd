"""The package's structure (issue 27): no import circle, no long function.

Both checks read the source with ``ast``; nothing is imported.

- No import circle: no module of ``src/napari_glimpse`` imports one that imports it back, directly
  or through others. Imports inside functions count (a circle hidden in a function is still one);
  imports under ``if TYPE_CHECKING:`` do not (they never run: annotations only).
  ``from . import x`` imports the submodule ``x``; ``from napari_glimpse import Name`` imports the
  module that defines ``Name`` (the package's lazy ``_EXPORTS``), not the whole package; importing
  ``a.b`` does not count as importing ``a``'s ``__init__`` (the package's and the CLI's import
  nothing heavy of their own).
- No function over 60 lines (its ``def`` to its last line, docstring included), except the few
  listed in ``LONG_FUNCTIONS`` with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "napari_glimpse"
MAX_LINES = 60

# "module:qualified.name" -> why it may be longer than MAX_LINES
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in ``tree``, functions included, ``if TYPE_CHECKING:`` blocks excluded."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _lazy_exports(modules: dict[str, Path]) -> dict[str, str]:
    """The package's ``_EXPORTS``: public name -> the dotted module that defines it."""
    tree = ast.parse(modules[PACKAGE].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {k: f"{PACKAGE}.{v}" for k, v in ast.literal_eval(node.value).items()}
    return {}


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at module level or inside functions)."""
    modules = _modules()
    exports = _lazy_exports(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package relative imports start from
        deps: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
                continue
            if node.level:
                base_parts = here[: len(here) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base not in modules:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # from . import x: the submodule x
                    deps.add(sub)
                elif base == PACKAGE and alias.name in exports:  # the lazy re-export's own module
                    deps.add(exports[alias.name])
                else:
                    deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps)


def closed_path(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def long_functions() -> dict[str, int]:
    """'module:qualified.name' -> its length in lines, for every function over MAX_LINES."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:  # prefix: "module:Class.function."
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                n = child.end_lineno - first + 1
                if n > MAX_LINES:
                    out[qual] = n
                walk(child, qual + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    for name, path in _modules().items():
        walk(ast.parse(path.read_text()), f"{name}:")
    return out


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert f"{PACKAGE}.cli" in graph and f"{PACKAGE}.cli.predict" in graph[f"{PACKAGE}.cli"]
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.io"]
    toy = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"b"}, "e": {"a"}}
    assert import_circles(toy) == [["a", "b", "c", "d"]]
    assert closed_path(["a", "b", "c", "d"], toy) == ["a", "b", "c", "a"]


def test_no_import_circle():
    graph = import_graph()
    circles = import_circles(graph)
    assert not circles, "import circles: " + "; ".join(
        " -> ".join(closed_path(c, graph)) + f" (all of: {', '.join(c)})" for c in circles)


def test_no_long_function():
    found = long_functions()
    over = {k: n for k, n in found.items() if k not in LONG_FUNCTIONS}
    assert not over, f"functions over {MAX_LINES} lines: " + ", ".join(f"{k} ({n})" for k, n in sorted(over.items()))
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not stale, f"LONG_FUNCTIONS lists functions no longer over {MAX_LINES} lines: {stale}"
