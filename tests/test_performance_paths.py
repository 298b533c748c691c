"""The paths the benchmark (bench/run.py) made fast keep their behaviour: what they skip is
only repeated work, never a check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cocoonplan.resolvers.resolution as resolution
from clirunner import copy_examples, run_cli


def test_version_loads_none_of_what_commands_use() -> None:
    probe = (
        "import json, sys\n"
        "from cocoonplan.cli import main\n"
        "sys.argv = ['cocoonplan', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    version, loaded = done.stdout.splitlines()
    assert version == "0.1.0"
    # pydantic comes with the `verify` command's option types (cocoonplan.proof.host).
    heavy = {
        "httpx",
        "jinja2",
        "deepdiff",
        "yaml",
        "cocoonplan.api",
        "cocoonplan.planner",
        "cocoonplan.render",
    }
    assert not heavy & set(json.loads(loaded))


def test_a_snapshot_named_by_many_specs_is_resolved_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = copy_examples(tmp_path / "repo")
    spec = (project / "agent-clone.yaml").read_text()
    for n in range(5):
        (project / f"clone-{n}.yaml").write_text(spec.replace("name: agent-clone", f"name: clone-{n}"))
    calls: list[Any] = []
    real = resolution.resolve_snapshot

    def counted(*args: Any) -> Any:
        calls.append(args[1:])
        return real(*args)

    monkeypatch.setattr(resolution, "resolve_snapshot", counted)
    result = run_cli(["plan", ".", "--json"], project)
    assert result.exit_code == 0, result.stderr
    names = {vm["name"] for vm in json.loads(result.stdout)["vms"]}
    assert {"agent-clone", *(f"clone-{n}" for n in range(5))} <= names
    assert len(calls) == 1


def test_validate_loads_nothing_that_plans(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "repo")
    probe = (
        "import json, os, sys\n"
        "from cocoonplan.cli import main\n"
        f"os.chdir({str(project)!r})\n"
        "sys.argv = ['cocoonplan', 'validate', '.']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "cocoonplan.context" in loaded and "cocoonplan.spec" in loaded
    heavy = {"httpx", "jinja2", "deepdiff", "cocoonplan.api", "cocoonplan.planner", "cocoonplan.render.text"}
    assert not heavy & loaded, heavy & loaded
    assert "ok  agent-clone.yaml:" in done.stdout
