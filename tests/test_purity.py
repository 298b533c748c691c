"""The planner is pure: nothing it imports, directly or through cocoonplan modules, does I/O.

Every cocoonplan module reachable from ``cocoonplan.planner`` is scanned: none may import
networking, processes, files, clocks or randomness, nor call ``open``/``print``/``input``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
FORBIDDEN_MODULES = {
    "httpx", "oras", "requests", "subprocess", "socket", "os", "shutil", "tempfile", "time", "datetime",
    "random", "secrets", "uuid", "pathlib", "io", "urllib", "yaml", "tarfile", "sys", "importlib", "builtins",
    "cocoonplan.api", "cocoonplan.resolvers", "cocoonplan.document", "cocoonplan.specfile",
    "cocoonplan.context", "cocoonplan.oci.sources", "cocoonplan.oci.registry", "cocoonplan.oci.layout",
    "cocoonplan.oci.cache",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__"}


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, package: str = "") -> set[str]:
    """Absolute names of everything imported; relative imports resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            if base:
                names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
    return names


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_MODULES)


def closure(root: str) -> dict[str, set[str]]:
    """Every cocoonplan module reachable from ``root``, with the modules each imports."""
    seen: dict[str, set[str]] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports = _imports(ast.parse(path.read_text()), package)
        if path.name == "__init__.py":
            imports |= {f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"}
        seen[name] = imports
        todo += [i for i in imports if i.startswith("cocoonplan")]
    return seen


PLANNER = closure("cocoonplan.planner")


def test_the_closure_reaches_the_planners_inputs() -> None:
    assert {
        "cocoonplan.planner.compile",
        "cocoonplan.spec",
        "cocoonplan.resolved",
        "cocoonplan.observed",
    } <= set(PLANNER)


@pytest.mark.parametrize("module", sorted(PLANNER))
def test_module_reachable_from_the_planner_is_pure(module: str) -> None:
    assert sorted(n for n in PLANNER[module] if _forbidden(n)) == []
    tree = ast.parse(_module_file(module).read_text())  # type: ignore[union-attr]
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    calls |= {
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert calls & FORBIDDEN_CALLS == set()


def test_the_scan_would_catch_an_impure_import() -> None:
    tree = ast.parse("import os\nfrom httpx import Client\nfrom cocoonplan.resolvers.node import x\n")
    assert sorted(n for n in _imports(tree) if _forbidden(n)) == ["cocoonplan.resolvers.node", "httpx", "os"]
    assert "cocoonplan.specfile" in closure("cocoonplan.api")
    relative = ast.parse("from . import hypervisor\nfrom ..resolvers import node\n")
    assert _imports(relative, "cocoonplan.planner") >= {
        "cocoonplan.planner.hypervisor",
        "cocoonplan.resolvers.node",
    }
