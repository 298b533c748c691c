"""Which project ``apply``, ``import`` and ``force-unlock`` act in when started outside it.

``plan --out FILE`` records the project directory relative to FILE (``Plan.project``, omitted
when FILE lies in it), so ``apply FILE`` finds the project from any directory as long as the
file stays where it was written; a moved file falls back on the working directory's project.
``apply PATH…`` uses the project it planned; ``import`` the spec's. With none found each says
where it looked, never that the node "is not declared" in a project that is not there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli

NO_PROJECT = "Error: no cocoonplan.yaml in {} or above"


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """A directory holding the examples' project as ``ex`` (and no project file itself)."""
    copy_examples(tmp_path / "ex")
    return tmp_path


def _plan(parent: Path, out: str) -> None:
    planned = run_cli(["plan", "ex", "--out", out], parent)
    assert planned.exit_code == 0, planned.stdout + planned.stderr


@pytest.mark.usefixtures("erofs_as_root")
def test_a_plan_written_outside_its_project_names_it_and_applies_from_there(parent: Path) -> None:
    _plan(parent, "p.json")
    document = json.loads((parent / "p.json").read_text())
    assert document["project"] == "ex"
    applied = run_cli(["apply", "p.json", "--content-only"], parent)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    # Written inside its project, the plan names none: the same document as `plan --json`.
    _plan(parent, "ex/q.json")
    assert "project" not in json.loads((parent / "ex/q.json").read_text())


def test_a_plan_moved_away_from_its_project_is_refused_saying_where_apply_looked(parent: Path) -> None:
    _plan(parent, "p.json")
    (parent / "plans").mkdir()
    (parent / "p.json").rename(parent / "plans/p.json")
    before = sorted(p.relative_to(parent) for p in (parent / "ex/node").rglob("*"))
    result = run_cli(["apply", "plans/p.json", "--content-only"], parent)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"{NO_PROJECT.format(parent / 'plans')}, nor in {parent} or above", result.stderr
    assert "--chdir DIR" in lines[1] and "not declared" not in result.stderr
    assert sorted(p.relative_to(parent) for p in (parent / "ex/node").rglob("*")) == before


@pytest.mark.usefixtures("erofs_as_root")
def test_apply_finds_the_project_from_the_plan_file_or_the_working_directory(parent: Path) -> None:
    _plan(parent, "ex/p.json")
    beside = run_cli(["apply", "ex/p.json", "--content-only"], parent)
    assert beside.exit_code == 0, beside.stdout + beside.stderr
    _plan(parent, "q.json")
    chdir = run_cli(["--chdir", "ex", "apply", "../q.json", "--content-only"], parent)
    assert chdir.exit_code == 0, chdir.stdout + chdir.stderr
    planned_now = run_cli(["apply", "ex", "--content-only", "--auto-approve"], parent)
    assert planned_now.exit_code == 0, planned_now.stdout + planned_now.stderr


def test_force_unlock_and_import_outside_a_project_say_where_they_looked(parent: Path) -> None:
    unlock = run_cli(["force-unlock", "node-a", "0123456789abcdef"], parent)
    assert unlock.exit_code == 1
    assert unlock.stderr.splitlines()[0] == NO_PROJECT.format(parent)
    assert "run `cocoonplan force-unlock` in the project directory" in unlock.stderr
    assert "not declared" not in unlock.stderr
    (parent / "lone.yaml").write_text((parent / "ex/agent-clone.yaml").read_text())
    imported = run_cli(["import", "node-a/agent-clone", "lone.yaml", "--auto-approve"], parent)
    assert imported.exit_code == 1
    assert imported.stderr.splitlines()[0] == NO_PROJECT.format(parent)
    assert "run `cocoonplan import` in the project directory" in imported.stderr
    # A spec inside the project is enough: its project declares the node.
    inside = run_cli(["import", "node-a/agent-clone", "ex/agent-clone.yaml", "--auto-approve"], parent)
    assert inside.exit_code == 1 and "is already cocoonplan's" in inside.stderr, inside.stderr
