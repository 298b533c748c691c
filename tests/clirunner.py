"""Run the real ``cocoonplan`` CLI in-process from a chosen working directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from typer.testing import CliRunner, Result

from cocoonplan.cli import app

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, input_text: str | None = None
) -> Result:
    """Invoke ``cocoonplan ARGS`` with ``cwd`` as the working directory (``input_text`` on stdin)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args, env=env, input=input_text, catch_exceptions=False)
    finally:
        os.chdir(previous)


def plan_json(project: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """``cocoonplan plan . --json`` in ``project``: the exit code and the plan document."""
    result = run_cli(["plan", ".", "--json", *extra], project)
    return result.exit_code, json.loads(result.stdout)


def vm_entry(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The plan document's entry for the VM ``name``."""
    return next(vm for vm in document["vms"] if vm["name"] == name)


def copy_examples(target: Path, *, node_b: bool = False, node_a: bool = True) -> Path:
    """A private copy of ``examples/`` (without any cache), so tests never write into the repo.

    Most tests are about one node: unless ``node_b``, the copy leaves out node-b (its root,
    its specs and its entry in the project file), keeping node-a's example as it is; with
    ``node_a=False`` (and ``node_b``) it leaves out node-a instead.
    """
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns(".cocoonplan", "build.py", "__pycache__"))
    project = target / "cocoonplan.yaml"
    text = project.read_text()
    if not node_b:
        shutil.rmtree(target / "node-b")
        for spec in target.glob("*-b.yaml"):
            spec.unlink()
        project.write_text(text[: text.index("  node-b:")])
    elif not node_a:
        shutil.rmtree(target / "node")
        for spec in set(target.glob("agent-*.yaml")) - set(target.glob("*-b.yaml")):
            spec.unlink()
        project.write_text(text[: text.index("  node-a:")] + text[text.index("  node-b:") :])
    return target


def set_node(project: Path, node: str, **settings: str) -> None:
    """Set ``settings`` (project-file key -> value) on ``node`` in ``project/cocoonplan.yaml``:
    a key the node has is replaced, any other added at the end of its entry."""
    config = project / "cocoonplan.yaml"
    lines = config.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {node}:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    for key, value in settings.items():
        line = f"    {key}: {value}"
        found = next((i for i in range(start + 1, end) if lines[i].startswith(f"    {key}:")), None)
        if found is None:
            lines.insert(end, line)
            end += 1
        else:
            lines[found] = line
    config.write_text("\n".join(lines) + "\n")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, for "nothing changed on disk" checks.

    The digest-addressed download cache (``.cocoonplan/``) is left out: it holds verified
    content only, never user state.
    """
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and ".cocoonplan" not in p.relative_to(root).parts
    )
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def example_builder() -> ModuleType:
    """``examples/build.py`` as a module: the seed scenario's artifacts and node VMs."""
    spec = importlib.util.spec_from_file_location("example_build", EXAMPLES / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
