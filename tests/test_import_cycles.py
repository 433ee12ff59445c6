"""No import cycles inside the `bastion` package, late imports included.

A cycle between two modules means neither can be read, tested or moved without the other, and Python only
tolerates it as long as every import in it happens late enough: an import inside a function is how a cycle
hides until someone moves it to the top of the file. So the graph here is built from the source (every
module's AST, not `sys.modules` after an import), with each import statement wherever it sits: at module
level, in a function, in a `try`. Only imports under `if TYPE_CHECKING:` are left out: they never run, so they
cannot take part in an import, and they are the one sanctioned way to name a type from a module above.

An edge goes to the module an import statement loads by name: `from bastion.coord import store` is an edge to
`bastion.coord.store` (a submodule), `from bastion.coord import open_store` an edge to `bastion.coord` (the
package's `__init__`). The parent packages Python imports on the way are not edges of their own: every
module would otherwise depend on its package's `__init__`, and an `__init__` that re-exports its submodules
(the usual shape) would be a cycle with each of them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "bastion"

ALLOWED: frozenset[frozenset[str]] = frozenset()
"""Strongly connected components accepted on purpose, each as the set of its modules, each with a comment
saying why it cannot be broken. Empty: keep it so."""


@dataclass(frozen=True)
class Edge:
    """One import statement of `source` that loads `target`."""

    source: str
    target: str
    path: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}    {self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def module_names(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package is named by its `__init__.py`."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, at any depth, except the bodies of `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module of the package (`import a.b.c` loads a.b.c)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _base(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The absolute module a `from ... import` names, relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    is_package = modules[module].name == "__init__.py"
    parts = module.split(".")
    drop = node.level - 1 if is_package else node.level
    anchor = parts[: len(parts) - drop] if drop else parts
    return ".".join([*anchor, node.module] if node.module else anchor)


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of one package module by another, with the statement that makes it."""
    edges: list[Edge] = []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in _imports(ast.parse(source, filename=str(path))):
            text = lines[node.lineno - 1].strip()
            targets: set[str] = set()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if (found := _known(alias.name, modules)) is not None:
                        targets.add(found)
            else:
                base = _base(module, node, modules)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:  # `from pkg import submodule`
                        targets.add(f"{base}.{alias.name}")
                    elif (found := _known(base, modules)) is not None:
                        targets.add(found)
            edges.extend(Edge(module, target, path, node.lineno, text) for target in sorted(targets)
                         if target != module)
    return edges


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted, iteratively (no recursion limit)."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        graph[e.source].append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(graph[succ])))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def shortest_cycle(component: list[str], edges: list[Edge]) -> list[Edge]:
    """One shortest cycle through the component's first module, as the import statements that form it."""
    members = set(component)
    inside: dict[str, list[Edge]] = {}
    for e in edges:
        if e.source in members and e.target in members:
            inside.setdefault(e.source, []).append(e)
    start = component[0]
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for e in inside.get(node, []):
                if e.target == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if e.target not in came_by:
                    came_by[e.target] = e
                    following.append(e.target)
        frontier = following
    raise AssertionError(f"component {component} has no cycle through {start}")


def describe(components: list[list[str]], edges: list[Edge]) -> str:
    """Each cycle: its modules, one shortest loop, and every import between its modules."""
    parts: list[str] = []
    for component in components:
        members = set(component)
        loop = shortest_cycle(component, edges)
        parts.append(f"cycle of {len(component)} modules: {', '.join(component)}")
        parts.append("  shortest loop:")
        parts.extend(f"    {e}" for e in loop)
        parts.append("  every import inside it:")
        parts.extend(f"    {e}" for e in edges if e.source in members and e.target in members)
    return "\n".join(parts)


def test_bastion_has_no_import_cycles() -> None:
    modules = module_names()
    edges = import_edges(modules)
    cycles = [c for c in strongly_connected(sorted(modules), edges) if frozenset(c) not in ALLOWED]
    assert not cycles, "import cycles in bastion (break them: a leaf module, or invert the dependency):\n" + \
        describe(cycles, edges)


def test_allow_list_names_real_cycles() -> None:
    """An allowed cycle that no longer exists must leave the list, so the list never hides a new one."""
    modules = module_names()
    found = {frozenset(c) for c in strongly_connected(sorted(modules), import_edges(modules))}
    stale = ALLOWED - found
    assert not stale, f"stale entries in ALLOWED: {[sorted(c) for c in stale]}"


# --- the detector itself, on a package made up for the purpose ------------------------------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_names(tmp_path, "pkg")


def test_detector_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    modules = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "def f():\n    from . import a\n    return a\n",
        "c.py": "import pkg.a\n",
    })
    edges = import_edges(modules)
    assert strongly_connected(sorted(modules), edges) == [["pkg.a", "pkg.b"]]
    loop = shortest_cycle(["pkg.a", "pkg.b"], edges)
    assert [(e.source, e.target, e.line) for e in loop] == [("pkg.a", "pkg.b", 1), ("pkg.b", "pkg.a", 2)]


def test_detector_resolves_relative_and_package_imports(tmp_path: Path) -> None:
    modules = _package(tmp_path, {
        "__init__.py": "from pkg.sub import helper\n",
        "sub/__init__.py": "from .leaf import helper\n",
        "sub/leaf.py": "from .. import other\n",
        "other.py": "from pkg.sub import leaf\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg\n",
    })
    edges = {(e.source, e.target) for e in import_edges(modules)}
    assert edges == {("pkg", "pkg.sub"), ("pkg.sub", "pkg.sub.leaf"), ("pkg.sub.leaf", "pkg.other"),
                     ("pkg.other", "pkg.sub.leaf")}
    assert strongly_connected(sorted(modules), import_edges(modules)) == [["pkg.other", "pkg.sub.leaf"]]


@pytest.mark.parametrize("module", ["bastion.coord.store", "bastion.dashboard.keys"])
def test_leaf_modules_import_no_sibling_backends(module: str) -> None:
    """The store protocol names no backend and the dashboard's app keys name no dashboard module: that is
    what keeps the factories above them free of cycles."""
    modules = module_names()
    package = module.rpartition(".")[0]
    targets = {e.target for e in import_edges(modules) if e.source == module}
    assert not {t for t in targets if t.startswith(package + ".") or t == package}
