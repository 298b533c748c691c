"""The planner is pure: nothing under planner/ may import I/O, clocks or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLANNER = Path(__file__).resolve().parent.parent / "src" / "cocoonplan" / "planner"
FORBIDDEN_MODULES = {
    "httpx",
    "oras",
    "requests",
    "subprocess",
    "socket",
    "os",
    "shutil",
    "tempfile",
    "time",
    "datetime",
    "random",
    "secrets",
    "uuid",
    "pathlib",
    "io",
    "urllib",
    "cocoonplan.api",
    "cocoonplan.resolvers",
    "cocoonplan.oci.sources",
    "cocoonplan.oci.registry",
    "cocoonplan.oci.layout",
    "cocoonplan.oci.cache",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_MODULES)


@pytest.mark.parametrize("module", sorted(p.name for p in PLANNER.glob("*.py")))
def test_planner_module_is_pure(module: str) -> None:
    tree = ast.parse((PLANNER / module).read_text())
    assert sorted(n for n in _imports(tree) if _forbidden(n)) == []
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert calls & FORBIDDEN_CALLS == set()


def test_the_scan_would_catch_an_impure_import() -> None:
    tree = ast.parse("import os\nfrom httpx import Client\nfrom cocoonplan.resolvers.node import x\n")
    assert sorted(n for n in _imports(tree) if _forbidden(n)) == ["cocoonplan.resolvers.node", "httpx", "os"]
