"""Tags are resolved once and pinned in cocoonplan.lock; a moved tag is shown, never taken silently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, run_cli, tree

RUN_TAG = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
OTHER_TAG = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "examples")


def _index(project: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((project / "oci" / "index.json").read_text())
    return loaded


def _digest_of(project: Path, tag: str) -> str:
    return next(
        m["digest"]
        for m in _index(project)["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )


def _move_tag(project: Path, tag: str, to: str) -> None:
    index = _index(project)
    target = next(
        m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == to
    )
    for manifest in index["manifests"]:
        if manifest["annotations"]["org.opencontainers.image.ref.name"] == tag:
            manifest["digest"], manifest["size"] = target["digest"], target["size"]
    (project / "oci" / "index.json").write_text(json.dumps(index))


def _plan(project: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli(["plan", ".", "--json", *extra], project)
    return result.exit_code, json.loads(result.stdout) if result.stdout else {}, result.stderr


def _source(document: dict[str, Any], vm: str) -> str:
    return str(next(v for v in document["vms"] if v["name"] == vm)["source"]["digest"])


def test_committed_lock_is_what_lock_writes(project: Path) -> None:
    committed = (project / "cocoonplan.lock").read_text()
    (project / "cocoonplan.lock").unlink()
    result = run_cli(["lock", "."], project)
    assert result.exit_code == 0, result.stderr
    assert (project / "cocoonplan.lock").read_text() == committed
    assert run_cli(["lock", "."], project).stderr.strip() == "cocoonplan.lock unchanged."


def test_missing_entries_are_resolved_and_shown_but_refused_when_locked(project: Path) -> None:
    (project / "cocoonplan.lock").unlink()
    code, document, _ = _plan(project)
    assert code == 0
    assert sorted(c["ref"] for c in document["lock_changes"]) == sorted(
        ["ghcr.io/cocoonstack/agent-snap:v1", OTHER_TAG, RUN_TAG]
    )
    assert all(c["before"] is None for c in document["lock_changes"])
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 2
    locked = run_cli(["plan", ".", "--locked"], project)
    assert locked.exit_code == 1
    assert "is not in cocoonplan.lock" in locked.stdout
    assert "run `cocoonplan lock`" in locked.stdout


def test_moved_tag_is_a_change_and_the_plan_keeps_the_locked_digest(project: Path) -> None:
    old, new = _digest_of(project, RUN_TAG), _digest_of(project, OTHER_TAG)
    _move_tag(project, RUN_TAG, OTHER_TAG)
    code, document, _ = _plan(project)
    assert code == 0
    assert document["lock_changes"] == [{"ref": RUN_TAG, "before": old, "after": new}]
    assert _source(document, "agent-run") == old
    human = run_cli(["plan", "."], project).stdout
    assert f"~ {RUN_TAG}: tag moved {old} → {new}" in human


def test_locked_mode_refuses_a_moved_tag(project: Path) -> None:
    _move_tag(project, RUN_TAG, OTHER_TAG)
    before = tree(project)
    result = run_cli(["plan", ".", "--locked", "--out", "plan.json"], project)
    assert result.exit_code == 1
    assert f"tag {RUN_TAG} moved since it was locked" in result.stdout
    assert tree(project) == before


def test_lock_update_takes_the_moved_tag(project: Path) -> None:
    new = _digest_of(project, OTHER_TAG)
    _move_tag(project, RUN_TAG, OTHER_TAG)
    assert run_cli(["lock", "."], project).stderr.strip() == "cocoonplan.lock unchanged."
    updated = run_cli(["lock", ".", "--update"], project)
    assert updated.exit_code == 0
    assert f"~ {RUN_TAG}:" in updated.stdout
    code, document, _ = _plan(project, "--locked")
    assert code == 0
    assert document["lock_changes"] == []
    assert _source(document, "agent-run") == new


def test_digest_references_need_no_lookup(project: Path) -> None:
    digest = _digest_of(project, RUN_TAG)
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace(RUN_TAG, f"ghcr.io/cocoonstack/cocoon/ubuntu@{digest}"))
    code, document, _ = _plan(project)
    assert code == 0
    assert _source(document, "agent-run") == digest
    assert RUN_TAG not in {c["ref"] for c in document["lock_changes"]}


def test_lock_writes_nothing_when_a_reference_fails(project: Path) -> None:
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace(RUN_TAG, "ghcr.io/cocoonstack/cocoon/ubuntu:no-such-tag"))
    before = tree(project)
    result = run_cli(["lock", "."], project)
    assert result.exit_code == 1
    assert "no-such-tag" in result.stderr
    assert "Error: " in result.stderr
    assert tree(project) == before


def test_locking_part_of_the_project_keeps_the_other_entries(project: Path) -> None:
    before = (project / "cocoonplan.lock").read_text()
    result = run_cli(["lock", "agent-clone.yaml"], project)
    assert result.exit_code == 0
    assert (project / "cocoonplan.lock").read_text() == before
    assert run_cli(["plan", ".", "--locked"], project).exit_code == 0
    (project / "agent-run.yaml").unlink()
    assert f"- {RUN_TAG}: no spec references it" in run_cli(["lock", "."], project).stdout
