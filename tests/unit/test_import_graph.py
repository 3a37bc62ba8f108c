"""The import graph of ``sidecar/``: no loops between packages or modules, no private names across modules.

Read with :mod:`ast` from the source (every ``import``, also inside functions and under
``TYPE_CHECKING``: a lazy import that goes up a layer is still a loop), so a loop that comes back
fails here before it confuses a reader or an import order.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (or the package a name was imported from)
    name: str | None  # the imported name (``from target import name``), if any
    line: int


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SIDECAR.rglob("*.py")):
        parts = path.relative_to(SIDECAR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "sidecar":
                        yield Import(module, alias.name, None, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                if source.split(".")[0] != "sidecar":
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in MODULES:  # ``from sidecar.grants import codec``: the module itself
                        yield Import(module, full, None, node.lineno)
                    else:
                        yield Import(module, source, alias.name, node.lineno)


IMPORTS = list(_imports())


def _unit(module: str) -> str:
    """The package a module belongs to: ``sidecar.policy.engine`` -> ``sidecar.policy``; a top-level
    module (``sidecar.wire``) is its own unit."""
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            visit(node)
    return found


def _explain(cycle: list[str], unit: bool) -> list[str]:
    members = set(cycle)
    key = _unit if unit else (lambda m: m)
    return sorted(
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if key(i.module) in members and key(i.target) in members and key(i.module) != key(i.target)
    )


def test_the_walk_sees_the_package() -> None:
    assert {"sidecar.runtime.active", "sidecar.wire", "sidecar.policy.engine"} <= set(MODULES)
    assert any(i.module == "sidecar.runtime.tasks" and i.target == "sidecar.runtime.active" for i in IMPORTS)


def test_no_import_loops_between_packages() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        source, target = _unit(imp.module), _unit(imp.target)
        if target not in (source, "sidecar"):
            edges[source].add(target)
    cycles = _cycles(edges)
    assert not cycles, [(cycle, _explain(cycle, unit=True)) for cycle in cycles]


def test_no_import_loops_between_modules() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target not in (imp.module, "sidecar"):
            edges[imp.module].add(imp.target)
    cycles = _cycles(edges)
    assert not cycles, [(cycle, _explain(cycle, unit=False)) for cycle in cycles]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{i.module}:{i.line} imports {i.target}.{i.name}"
        for i in IMPORTS
        if i.name is not None and _private(i.name) and i.target != i.module
    ]
    offenders += [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS if any(map(_private, i.target.split(".")))]
    assert not offenders


def test_no_module_reaches_into_another_modules_private_attributes() -> None:
    """``from sidecar.grants import codec`` then ``codec._helper(...)`` is a private import too."""
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {
            alias.asname or alias.name.split(".")[-1]
            for i in ast.walk(tree)
            if isinstance(i, ast.ImportFrom | ast.Import)
            for alias in i.names
            if any(imp.module == module and imp.target.endswith(alias.name) and imp.name is None for imp in IMPORTS)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                offenders.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offenders


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("sidecar.runtime.snapshot", "sidecar.runtime.active"),
        ("sidecar.runtime.snapshot", "sidecar.runtime.tasks"),
        ("sidecar.runtime.active", "sidecar.runtime.tasks"),
        ("sidecar.runtime.inputs", "sidecar.runtime.snapshot"),
        ("sidecar.policy", "sidecar.runtime"),
        ("sidecar.grants", "sidecar.policy"),
        ("sidecar.identity", "sidecar.config"),
        ("sidecar.bootstrap", "sidecar.tls_intercept"),
        ("sidecar.wire", "sidecar"),
        ("sidecar.runtime", "sidecar.authority"),  # the runtime asks a FeedGate; serve wires the client
        ("sidecar.authority", "sidecar.runtime"),  # the authority is no sidecar
        ("sidecar.authority.protocol", "sidecar.authority.server"),
        ("sidecar.agentproto", "sidecar.config"),
        ("sidecar.agentproto", "sidecar.policy"),
        ("sidecar.agentproto", "sidecar.envoy_authz"),
    ],
)
def test_layers_import_downwards_only(lower: str, upper: str) -> None:
    """``lower`` never imports ``upper`` (or anything below it): one direction between rooms."""
    offenders = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if (i.module == lower or i.module.startswith(lower + "."))
        and (i.target == upper or i.target.startswith(upper + "."))
        and not (upper == "sidecar" and i.target == i.module)
    ]
    assert not offenders


def test_only_the_protocol_edge_reads_ext_authz_protobufs() -> None:
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            protobufs = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("envoy.service.auth")
            if protobufs and not module.startswith("sidecar.envoy_authz"):
                offenders.append(f"{module}:{node.lineno}")
    assert not offenders


def test_test_modules_import_only_the_support_package() -> None:
    """Tests share helpers through ``tests/support`` (and fixtures through ``conftest.py``), never
    by importing another test module."""
    tests = SIDECAR.parent / "tests"
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(tests)}:{node.lineno} imports {name}"
                for name in names
                if name.startswith("tests.") and not name.startswith("tests.support")
            ]
    assert not offenders
