"""The import graph stays as docs/architecture.md draws it: packages in layers, each
importing only packages below it; no import cycle between modules anywhere; the web
framework only in the HTTP layers. Read from the source with ``ast`` (imports inside
functions count too), so a lazy import cannot hide an edge.

``python tests/test_architecture.py [SRC]`` prints the package graph (of another
checkout's ``src/trustmesh`` when given), marking each edge that breaks the layers."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "trustmesh"

# Packages from the top down; a package may import only packages of a lower rank.
# Packages of one rank are peers and import none of each other.
LAYERS: list[tuple[str, list[str]]] = [
    ("entry points", ["cli"]),
    ("entry points", ["bench"]),
    ("entry points", ["sim"]),
    ("processes", ["server", "agent", "sidecar"]),
    ("services", ["oauth"]),
    ("analytics", ["analytics"]),
    ("domain", ["audit"]),
    ("domain", ["policy"]),
    ("domain", ["revocation"]),
    ("domain", ["registry"]),
    ("domain", ["identity"]),
    ("domain", ["manifests"]),
    ("domain", ["request"]),
    ("client SDK", ["client"]),
    ("base", ["spiffeid", "storage"]),
    ("base", ["common"]),
]
RANK = {package: len(LAYERS) - i for i, (_, packages) in enumerate(LAYERS) for package in packages}

# Where the web framework may be imported: apps, routes, and what serves or renders HTTP.
WEB_FRAMEWORK = ("starlette", "uvicorn")
HTTP_LAYER = (
    "trustmesh.server.app",
    "trustmesh.server.routes",
    "trustmesh.agent.app",
    "trustmesh.agent.envoy",
    "trustmesh.common.http",
    "trustmesh.common.serving",
    "trustmesh.client._middleware",
    "trustmesh.sim.cluster",
)


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: frozenset[str] = frozenset(), src: Path = SRC) -> set[str]:
    """Every module ``path`` imports (absolute names), anywhere in the file.
    ``from package import submodule`` is an import of the submodule (``modules``
    names the known ones), ``from package import name`` one of the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path, src).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if submodule in modules else module)
    return found


def graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = {module_name(p, src): p for p in src.rglob("*.py")}
    known = frozenset(modules)
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = imports_of(path, known, src)
        edges[name] = {target for target in found if target in known} - {name}
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in edges.items():
        for target in targets:
            source, dest = package_of(module), package_of(target)
            if source and dest and source != dest:
                packages[source].add(dest)
    return packages


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        for node in sorted(edges):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)  # the rest of the process keeps its own
    return found


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(RANK), f"packages not in LAYERS (or gone): {packages ^ set(RANK)}"


def test_packages_import_only_packages_below_them() -> None:
    edges = graph()
    wrong = []
    for module, targets in sorted(edges.items()):
        source = package_of(module)
        for target in sorted(targets):
            dest = package_of(target)
            if source and dest and source != dest and RANK[dest] >= RANK[source]:
                wrong.append(f"{module} imports {target} ({source} may not import {dest})")
    assert not wrong, "\n".join(wrong)


def test_no_module_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_web_framework_stays_in_the_http_layer() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        if name.startswith(HTTP_LAYER):
            continue
        for target in sorted(imports_of(path)):
            if target.split(".")[0] in WEB_FRAMEWORK:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "business logic imports the web framework:\n" + "\n".join(wrong)


def test_the_checks_see_a_violation() -> None:
    """The checks above would notice an upward import and a cycle."""
    edges = {
        "trustmesh.common.a": {"trustmesh.server.b"},
        "trustmesh.server.b": {"trustmesh.common.a"},
    }
    assert RANK["server"] > RANK["common"]
    assert cycles(edges) == [["trustmesh.common.a", "trustmesh.server.b"]]


if __name__ == "__main__":
    src = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else SRC
    packages = package_edges(graph(src))

    def rank(package: str) -> int:
        return RANK.get(package, 0)

    for package, targets in sorted(packages.items(), key=lambda kv: (-rank(kv[0]), kv[0])):
        shown = [
            t if rank(t) < rank(package) else f"{t} (UP)"
            for t in sorted(targets, key=lambda t: (-rank(t), t))
        ]
        print(f"{package:11s} -> {', '.join(shown)}")
    for cycle in cycles(graph(src)):
        print("cycle: " + " <-> ".join(cycle))
