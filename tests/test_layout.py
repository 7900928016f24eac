"""The package's import graph: no cycle, and imports that go one way.

Every module of ``petsage_grpc`` (but the generated stubs) is parsed with :mod:`ast`; each
``import`` and ``from ... import`` of the package, at the top of a module, inside a
function or under ``TYPE_CHECKING``, is an edge. Names imported from the package's root
count as imports of the module that defines them (its ``_HOMES``), so the public facade
cannot hide a wrong-way import. The parts import one way, ``cli`` → ``fleet`` → ``server``
→ ``services`` → ``board``, the command-line clients import nothing of the server, and the
fleet view (a client of many servers) nothing of the server, the services or the board.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from conftest import ROOT

PACKAGE: Final = "petsage_grpc"
PACKAGE_DIR: Final = ROOT / PACKAGE
SKIPPED: Final = f"{PACKAGE}._generated"

# Each part may import the parts after it, never those before it.
LAYERS: Final = ("cli", "fleet", "server", "services", "board")
# The command-line clients: an exec probe must start without the server.
CLIENTS: Final = ("cli._probe", "cli._h2_unary", "cli._client", "cli._tls_relay")
LEAVES: Final = ("_durations",)


@dataclass(frozen=True)
class Import:
    """One import of a package module: where it is written and what it loads."""

    source: str
    target: str
    line: int
    type_checking_only: bool

    def where(self) -> str:
        """``module:line imports target``, for failure messages."""
        return f"{self.source}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    modules = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
    return {
        name: path
        for name, path in modules.items()
        if name != SKIPPED and not name.startswith(SKIPPED + ".")
    }


def public_homes(root_init: Path) -> dict[str, str]:
    """The root's ``_HOMES``: public name -> the module that defines it."""
    for node in ast.parse(root_init.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "_HOMES"
        ):
            homes = ast.literal_eval(node.value)
            return {name: f"{PACKAGE}.{home}" for name, home in homes.items()}
    raise AssertionError(f"{root_init}: no _HOMES table")


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            for child in node.body:
                for inner in ast.walk(child):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(name: str, path: Path, modules: set[str], homes: dict[str, str]) -> list[Import]:
    """Every import of another package module written in *path*, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = _type_checking_lines(tree)
    found: list[Import] = []

    def add(target: str, node: ast.stmt) -> None:
        if target == SKIPPED or target.startswith(SKIPPED + "."):
            return  # the stubs are outside the graph (they import only each other)
        # `import petsage_grpc.a.b` loads a.b; fall back to the longest module prefix.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(Import(name, target, node.lineno, node.lineno in guarded))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, path.name == "__init__.py", node)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                if base == PACKAGE and alias.name in homes:
                    add(homes[alias.name], node)
                elif f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}", node)
                else:
                    add(base, node)
    return found


def import_graph() -> list[Import]:
    modules = package_modules()
    homes = public_homes(PACKAGE_DIR / "__init__.py")
    return [
        edge
        for name, path in modules.items()
        for edge in imports_of(name, path, set(modules), homes)
    ]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_cycle_in(component, edges) for component in components]


def _cycle_in(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the component's first module, by breadth-first search."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(edges.get(node, set()) & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {sorted(component)}")


def part_of(module: str) -> str:
    """``petsage_grpc.server._http`` -> ``server``; root-level modules -> their name."""
    return module.split(".")[1] if "." in module else ""


def in_module(module: str, relative: str) -> bool:
    full = f"{PACKAGE}.{relative}"
    return module == full or module.startswith(full + ".")


def layering_violations(graph: list[Import]) -> list[str]:
    problems = []
    for edge in graph:
        source, target = part_of(edge.source), part_of(edge.target)
        if source in LAYERS and target in LAYERS and LAYERS.index(target) < LAYERS.index(source):
            problems.append(f"{edge.where()}: {source} must not import {target}")
        # The fleet follower is a client of many servers: nothing of the server side.
        if source == "fleet" and target in LAYERS[2:]:
            problems.append(f"{edge.where()}: the fleet view must not import {target}")
        if any(in_module(edge.source, client) for client in CLIENTS) and target in LAYERS[1:]:
            problems.append(f"{edge.where()}: a command-line client must not import {target}")
        if any(in_module(edge.source, leaf) for leaf in LEAVES):
            problems.append(f"{edge.where()}: {edge.source} is a leaf module")
    return problems


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph()


def test_every_part_is_parsed(graph: list[Import]) -> None:
    modules = package_modules()
    for part in LAYERS:
        assert f"{PACKAGE}.{part}" in modules, part
    for client in CLIENTS:
        assert f"{PACKAGE}.{client}" in modules, client
    assert not any(name.startswith(SKIPPED) for name in modules)
    sources = {edge.source for edge in graph}
    # Both kinds of import are seen: top-level (the server assembles the services) and
    # inside a function (`serve` is loaded only when the command is `serve`).
    assert any(
        edge.source == f"{PACKAGE}.server._server" and edge.target.startswith(f"{PACKAGE}.services")
        for edge in graph
    )
    assert any(
        edge.source == f"{PACKAGE}.cli._main" and edge.target == f"{PACKAGE}.server._server"
        for edge in graph
    )
    assert len(sources) >= len(LAYERS)


def test_no_import_cycle(graph: list[Import]) -> None:
    edges: dict[str, set[str]] = {}
    for edge in graph:
        edges.setdefault(edge.source, set()).add(edge.target)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_go_one_way(graph: list[Import]) -> None:
    problems = layering_violations(graph)
    assert not problems, "\n".join(problems)


def test_subpackage_init_modules_import_nothing() -> None:
    offenders = []
    for name, path in package_modules().items():
        if path.name != "__init__.py" or name == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) or (
                isinstance(node, ast.ImportFrom) and node.module != "__future__"
            ):
                offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "a subpackage __init__ must stay import-free:\n" + "\n".join(offenders)


def test_root_loads_no_module_of_the_package_on_import(graph: list[Import]) -> None:
    # Every module's import runs the root __init__ first; it re-exports lazily, so the
    # clients' lean start does not depend on what the root names.
    eager = [e.where() for e in graph if e.source == PACKAGE and not e.type_checking_only]
    assert not eager, "the root package must re-export lazily:\n" + "\n".join(eager)


def test_the_checks_catch_a_cycle_and_a_wrong_way_import() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(find_cycles(edges)) == [["a", "b", "c", "a"], ["d", "d"]]
    wrong = [
        Import(f"{PACKAGE}.board._status", f"{PACKAGE}.services._health", 7, False),
        Import(f"{PACKAGE}.cli._probe", f"{PACKAGE}.board._status", 9, True),
        Import(f"{PACKAGE}.cli._status_command", f"{PACKAGE}.services._auth", 3, False),
        Import(f"{PACKAGE}.server._server", f"{PACKAGE}.board._status", 5, False),
    ]
    assert layering_violations(wrong) == [
        f"{PACKAGE}.board._status:7 imports {PACKAGE}.services._health: "
        "board must not import services",
        f"{PACKAGE}.cli._probe:9 imports {PACKAGE}.board._status: "
        "a command-line client must not import board",
    ]
