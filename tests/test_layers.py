"""The import graph keeps the layers of README "Where things are": no upward import, no cycle.

Layers, bottom to top: core → notifications → scheduler → exchanges → accounts → positions →
orders → reporting. A module may import its own app and any app below it, never one above.
Every import counts, including those inside functions (a local import must not hide a cycle);
only `AppConfig.ready()` may import its own app's modules late, as Django requires.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["core", "notifications", "scheduler", "exchanges", "accounts", "positions", "orders", "reporting"]
RANK = {app: rank for rank, app in enumerate(LAYERS)}


def _modules() -> dict[str, Path]:
    found = {}
    for app in LAYERS:
        for path in sorted((ROOT / app).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside AppConfig.ready) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_ready: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_ready) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from pkg import name` may name a submodule: _graph keeps whichever is a module.
                out.append((child.module, child.lineno, in_ready))
                out.extend((f"{child.module}.{alias.name}", child.lineno, in_ready) for alias in child.names)
            visit(child, in_ready or (isinstance(child, ast.FunctionDef) and child.name == "ready"))

    visit(tree, False)
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    upward = []
    for name, path in modules.items():
        app = name.split(".")[0]
        imported = _imports(path)
        submodules = {(target.rsplit(".", 1)[0], line) for target, line, _ in imported if target in modules}
        for target, line, in_ready in imported:
            if (target, line) in submodules:
                continue  # `from pkg import submodule`: the edge is to the submodule
            top = target.split(".")[0]
            if top not in RANK:
                continue
            if RANK[top] > RANK[app]:
                where = f"{path.relative_to(ROOT)}:{line} ({app}) imports {top}"
                if where not in upward:
                    upward.append(where)
            if target in modules and target != name and not in_ready:
                edges[name].add(target)
    return edges, upward


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    return found


def test_no_app_imports_a_higher_layer():
    _, upward = _graph()
    assert upward == [], "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert cycles == [], "import cycles (function-local imports included):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_checker_sees_an_upward_and_a_local_import(tmp_path):
    """The checker itself: a local upward import and a two-module cycle are both caught."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from orders.models import Fill\n")
    assert ("orders.models", 2, False) in _imports(sample)
    assert _cycles({"a.x": {"a.y"}, "a.y": {"a.x"}, "a.z": {"a.x"}}) == [["a.x", "a.y"]]
