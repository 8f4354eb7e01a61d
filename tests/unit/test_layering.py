"""Imports flow one way. Every module's imports (also those inside functions) are read with ``ast``;
an import against the floors below, or any import cycle between modules, fails the test.

The rule, written once: a module may import its own package and the floors listed for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Floors, from the ground up. The base is a list of modules (the rest of ``unbroken`` is the top).
BASE = ("unbroken.errors", "unbroken.http", "unbroken.config", "unbroken.contract", "unbroken.procs",
        "unbroken.__init__", "unbroken")
STACK = ("unbroken.launcher", "unbroken.tinymodel")  # the top of unbroken, below loadtest
CLI = ("unbroken.cli",)  # the very top: dispatches to every entry point
# layer -> the layers it may import (besides itself). A DAG: floors cannot form a cycle.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "kvsync": {"base"},
    "replica": {"base", "kvsync"},  # replica -> kvsync, never back; the engine only sees the contract
    "gateway": {"base"},
    "stack": {"base", "kvsync", "replica", "gateway"},
    "loadtest": {"base", "kvsync", "replica", "gateway", "stack"},
    "cli": {"base", "kvsync", "replica", "gateway", "stack", "loadtest"},
}
PACKAGES = ("unbroken", "gateway", "replica", "kvsync", "loadtest")


def layer_of(module: str) -> str | None:
    """The floor of a project module (None for third-party modules)."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top == "unbroken":
        for layer, modules in (("stack", STACK), ("cli", CLI)):
            if any(module == m or module.startswith(m + ".") for m in modules):
                return layer
        return "base"
    return top


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every project module ``source`` imports, anywhere in it (functions, TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            for alias in node.names:  # ``from pkg import module`` imports pkg.module
                found.add(f"{base}.{alias.name}")
    return {m for m in found if layer_of(m) is not None}


def read_graph(root: Path) -> dict[str, set[str]]:
    """module -> project modules it imports (resolved to modules that exist)."""
    sources = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            sources[module_name(path, root)] = path
    graph: dict[str, set[str]] = {}
    for mod, path in sources.items():
        targets = set()
        for imp in imports_of(path.read_text(), mod, path.name == "__init__.py"):
            while imp and imp not in sources:  # ``from pkg import name`` where name is not a module
                imp = imp.rpartition(".")[0]
            if imp and imp != mod:
                targets.add(imp)
        graph[mod] = targets
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in graph.items():
        src = layer_of(mod)
        assert src is not None
        for t in sorted(targets):
            dst = layer_of(t)
            if dst is not None and dst != src and dst not in ALLOWED[src]:
                out.append(f"{mod} ({src}) imports {t} ({dst})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    edges = graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# -- the project ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return read_graph(ROOT)


def test_every_import_goes_down_the_floors(graph: dict[str, set[str]]) -> None:
    assert len(graph) > 50  # the packages were read
    assert violations(graph) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []
    floors = {layer: set(allowed) for layer, allowed in ALLOWED.items()}
    assert cycles(floors) == [], "the floors themselves must not loop"


def test_the_contract_is_ground_floor(graph: dict[str, set[str]]) -> None:
    for mod, targets in graph.items():
        if mod.startswith("unbroken.contract"):
            assert all(layer_of(t) == "base" for t in targets), (mod, targets)


# -- the checker itself fails on what it is meant to catch --------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _synthetic(tmp_path: Path, extra: dict[str, str]) -> dict[str, set[str]]:
    files = {f"{pkg}/__init__.py": "" for pkg in PACKAGES}
    files.update({"unbroken/errors.py": "import os\n", "gateway/relay.py": "from unbroken.errors import x\n",
                  "kvsync/client.py": "from unbroken import errors\n", "replica/engine.py": "import kvsync.client\n"})
    files.update(extra)
    _write(tmp_path, files)
    return read_graph(tmp_path)


def test_a_clean_synthetic_tree_passes(tmp_path: Path) -> None:
    g = _synthetic(tmp_path, {})
    assert violations(g) == [] and cycles(g) == []


@pytest.mark.parametrize("path,text,needle", [
    ("kvsync/store.py", "def f():\n    from replica.engine import LLMEngine\n", "kvsync.store (kvsync) imports replica.engine"),
    ("unbroken/http.py", "from gateway import relay\n", "unbroken.http (base) imports gateway.relay"),
    ("unbroken/contract/kv.py", "import loadtest.chaos\n", "unbroken.contract.kv (base) imports loadtest"),
    ("gateway/server.py", "from ..replica import engine\n", "gateway.server (gateway) imports replica.engine"),
    ("unbroken/launcher.py", "if True:\n    import loadtest.faultproxy\n",
     "unbroken.launcher (stack) imports loadtest"),
    ("unbroken/cli.py", "def up():\n    import loadtest.faultproxy\n", ""),  # the CLI may
])
def test_an_import_against_the_floors_is_caught(tmp_path: Path, path: str, text: str, needle: str) -> None:
    g = _synthetic(tmp_path, {path: text})
    found = violations(g)
    if needle:
        assert any(needle in v for v in found), found
    else:
        assert found == []


def test_a_cycle_is_caught_even_inside_functions(tmp_path: Path) -> None:
    g = _synthetic(tmp_path, {
        "gateway/config.py": "def check():\n    from gateway.policies import POLICIES\n",
        "gateway/policies/__init__.py": "from gateway.policies import least_load\n",
        "gateway/policies/least_load.py": "from gateway.config import RoutingSection\n",
        "gateway/policies/round_robin.py": "from gateway.policies import POLICIES\n",
    })
    assert cycles(g) == [["gateway.config", "gateway.policies", "gateway.policies.least_load"]]
    g = _synthetic(tmp_path / "a", {  # a policy importing its package, which imports the policy
        "gateway/policies/__init__.py": "from gateway.policies import round_robin\n",
        "gateway/policies/round_robin.py": "from gateway.policies import POLICIES\n"})
    assert cycles(g) == [["gateway.policies", "gateway.policies.round_robin"]]
    g = _synthetic(tmp_path / "b", {"unbroken/launcher.py": "import loadtest.faults\n",
                                    "loadtest/faults.py": "from unbroken.launcher import Stack\n"})
    assert cycles(g) == [["loadtest.faults", "unbroken.launcher"]]
