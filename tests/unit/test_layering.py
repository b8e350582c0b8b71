"""The import layering of agent_image/ and supervisor/, read from the source (nothing is imported).

Every import counts, including those inside functions (lazy imports keep start-up fast, but a
cycle through them is still a cycle: `cli` <-> `watch` was one); only imports under
``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("agent_image", "supervisor")
# The one module allowed to import each third-party library that we keep behind an adapter.
SOLE_IMPORTERS = {
    "docker": "supervisor.runtime.docker",
    "kubernetes": "supervisor.runtime.kubernetes.runtime",
    "yaml": "agent_image.protocol.loader",
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as a dotted module name, and where it is."""

    target: str
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for stmt in child.orelse:
                    yield from walk_stmt(stmt)
                continue
            yield from walk_stmt(child)

    def walk_stmt(node: ast.AST) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield Import(sub if sub in known else module, node.lineno)
        else:
            yield from walk(node)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)))


def _graph() -> tuple[dict[str, Path], dict[str, list[Import]]]:
    modules = _modules()
    known = set(modules)
    return modules, {name: list(_imports(name, path, known)) for name, path in modules.items()}


def _top(target: str) -> str:
    return target.split(".", 1)[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest way back to `start` inside the component, for a readable message.
        paths = {start: [start]}
        frontier = [start]
        found: list[str] | None = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & members):
                    if w == start:
                        found = [*paths[v], start]
                        break
                    if w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found or component)
    return cycles


def test_agent_image_never_imports_supervisor() -> None:
    """agent_image/ runs inside the sandbox: nothing in it imports supervisor (the host side)."""
    modules, imports = _graph()
    bad = [
        f"{modules[name].relative_to(REPO)}:{imp.line} imports {imp.target}"
        for name, found in imports.items()
        if _top(name) == "agent_image"
        for imp in found
        if _top(imp.target) == "supervisor"
    ]
    assert not bad, "agent_image must not import supervisor:\n" + "\n".join(bad)


def test_docker_and_yaml_each_have_one_importer() -> None:
    """docker, kubernetes and yaml each have one importer (runtime/docker.py, runtime/kubernetes/runtime.py, protocol/loader.py)."""
    modules, imports = _graph()
    bad = [
        f"{modules[name].relative_to(REPO)}:{imp.line} imports {imp.target} (only {SOLE_IMPORTERS[_top(imp.target)]} may)"
        for name, found in imports.items()
        for imp in found
        if _top(imp.target) in SOLE_IMPORTERS and name != SOLE_IMPORTERS[_top(imp.target)]
    ]
    assert not bad, "\n".join(bad)
    for library, owner in SOLE_IMPORTERS.items():
        assert any(_top(i.target) == library for i in imports[owner]), f"{owner} no longer imports {library}"


def test_no_import_cycles() -> None:
    """No first-party module reaches itself through imports (lazy ones included, TYPE_CHECKING ones not)."""
    modules, imports = _graph()
    edges = {
        name: {i.target for i in found if i.target in modules and i.target != name} for name, found in imports.items()
    }
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path: Path) -> None:
    """The import reader finds imports inside functions and ignores `if TYPE_CHECKING:` blocks."""
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import typed_only\n"
        "def f():\n    import lazy_one\n    from . import sibling\n"
    )
    found = {i.target for i in _imports("pkg.mod", src, {"pkg.sibling"})}
    assert found == {"typing", "lazy_one", "pkg.sibling"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
