"""Plans against node roots built with cocoon's real file formats (the reader is never mocked).

Each case builds a node root in a temporary directory, plans the shipped example specs
against it (content from the committed OCI layout), and pins the human and JSON renders.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from clirunner import copy_examples, example_builder, plan_json, run_cli, tree, vm_entry
from cocoonplan.cocoon import MetadataEngine
from cocoonplan.resolvers.node import read_node_root
from ocifixture import OwnerRecord, node_root, snapshot, write_layout
from snapshotext import JSONFile, TextFile

build = example_builder()
ARTIFACTS, SCENARIO_VMS = build.scenario()
SNAP = ARTIFACTS[build.AGENT_SNAP]


def _healthy_vms() -> list[Any]:
    # agent-clone on the snapshot's own eleven layers; the others as in the example.
    return [dataclasses.replace(vm, layers=None) if vm.name == "agent-clone" else vm for vm in SCENARIO_VMS]


def _owned(**overrides: OwnerRecord | None) -> dict[str, OwnerRecord]:
    owners = {vm_id: owner for vm_id, owner in build.owned(ARTIFACTS).items()}
    for name, owner in overrides.items():
        vm_id = next(vm.id for vm in SCENARIO_VMS if vm.name == name.replace("_", "-"))
        if owner is None:
            owners.pop(vm_id)
        else:
            owners[vm_id] = owner
    return owners


ENGINE = {"metadata": "json"}
"""The metadata engine of the node roots the current test builds (see :func:`_engine`)."""


@pytest.fixture(autouse=True, params=["json", "sqlite"])
def _engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case's node root is also converted to SQLite metadata: the reader must see the
    same node either way, so the plans are pinned alike."""
    monkeypatch.setitem(ENGINE, "metadata", request.param)


SQLITE_ROOT = "node-sqlite"
"""Where the sqlite variant puts the converted root, beside the JSON one."""


def _converted(project: Path) -> None:
    """The root ``node`` converted to SQLite metadata at :data:`SQLITE_ROOT`, checked to read as
    the same node. These cases are v0.3.8 plans, and v0.3.8 has no SQLite engine (cocoonplan
    refuses that pair), so the plan itself is made from the JSON root."""
    converted = project / SQLITE_ROOT
    shutil.copytree(project / "node", converted, symlinks=True)
    build.to_sqlite(converted)
    from_json, from_sqlite = read_node_root(project / "node"), read_node_root(converted)
    assert from_sqlite.metadata_engine is MetadataEngine.SQLITE
    assert from_sqlite.model_copy(update={"metadata_engine": MetadataEngine.JSON}) == from_json


def _project(tmp_path: Path, vms: list[Any], owned: dict[str, OwnerRecord]) -> Path:
    project = copy_examples(tmp_path / "examples")
    shutil.rmtree(project / "node")
    node_root(
        project / "node",
        images={k: v for k, v in ARTIFACTS.items() if k != build.AGENT_SNAP},
        vms=vms,
        owned=owned,
    )
    if ENGINE["metadata"] == "sqlite":
        _converted(project)
    # The engine is under test here, not the planning rules: the root is planned as v0.3.8.
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace("    cpus: 16\n", "    cpus: 16\n    cocoonVersion: v0.3.8\n")
    )
    return project


def _pin(
    project: Path,
    document: dict[str, Any],
    snapshot_json: SnapshotAssertion,
    snapshot_text: SnapshotAssertion,
) -> None:
    assert document == snapshot_json
    assert run_cli(["plan", "."], project).stdout == snapshot_text


@pytest.fixture
def snapshot_json(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(JSONFile)


@pytest.fixture
def snapshot_text(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(TextFile)


def test_healthy_clone_is_a_no_op(
    tmp_path: Path, snapshot_json: SnapshotAssertion, snapshot_text: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 0
    assert {vm["name"]: vm["action"] for vm in document["vms"]} == {
        "agent-clone": "no-op",
        "agent-run": "no-op",
    }
    assert all(vm["drift"] == [] and vm["changes"] == [] for vm in document["vms"])
    assert vm_entry(document, "agent-clone")["vm_id"] == build.AGENT_CLONE_ID
    assert all(vm["observed_fingerprint"].startswith("sha256:") for vm in document["vms"])
    _pin(project, document, snapshot_json, snapshot_text)


def test_clone_on_the_substituted_layer_set_drifts_and_is_replaced(
    tmp_path: Path, snapshot_json: SnapshotAssertion, snapshot_text: SnapshotAssertion
) -> None:
    project = _project(tmp_path, list(SCENARIO_VMS), _owned())
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 2
    clone = vm_entry(document, "agent-clone")
    assert clone["action"] == "replace"
    layers = [d for d in clone["drift"] if d["kind"] == "layer"]
    alien = [d for d in layers if d["found"]]
    assert len(alien) == 4 and {tuple(d["found_in"]) for d in alien} == {(build.XFACE_0513,)}
    assert len([d for d in layers if d["found"] is None]) == 5
    changed = {(c["kind"], tuple(c["path"]), c["op"]): c for c in clone["changes"]}
    # Disks pair by serial: four layers swapped, five inserted, the cow and data disk moved.
    assert {("disk", ("disks", f"cocoon-layer{i}"), "update") for i in range(2, 6)} <= changed.keys()
    assert {("disk", ("disks", f"cocoon-layer{i}"), "add") for i in range(6, 11)} <= changed.keys()
    moved = {
        path[1]: (c["before"]["index"], c["after"]["index"])
        for (_, path, op), c in changed.items()
        if op == "move"
    }
    assert moved == {"cocoon-cow": (6, 11), "db": (7, 12)}
    # The layer swap owns its config.json path and its blobs: one fact, said once.
    path = changed["config", ("config", "disks", "cocoon-layer2", "path"), "update"]
    assert path["cause"] == ["disks", "cocoon-layer2"]
    assert clone["replace_paths"] == ["disks"]
    assert clone["action_reason"] == "replace_because_layers_drifted"
    _pin(project, document, snapshot_json, snapshot_text)


def test_moved_snapshot_tag_replaces_old_to_new(
    tmp_path: Path, snapshot_json: SnapshotAssertion, snapshot_text: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    source = SNAP.snapshot.vm
    rebaked = snapshot(
        ARTIFACTS[build.XFACE], base_ref=build.XFACE, vm=source, snapshot_id="R3BAKEDSNAPSH0TAAAAAAAAAAA"
    )
    write_layout(project / "oci", {**ARTIFACTS, build.AGENT_SNAP: rebaked})
    assert run_cli(["lock", ".", "--update"], project).exit_code == 0
    code, document = plan_json(project, "--locked")
    assert code == 0
    clone = vm_entry(document, "agent-clone")
    assert clone["action"] == "replace"
    assert {
        "kind": "source",
        "path": ["source", "digest"],
        "op": "update",
        "before": SNAP.digest,
        "after": rebaked.digest,
        "cause": None,
    } in clone["changes"]
    assert clone["drift"] == []
    assert "source" in clone["replace_paths"]
    assert (
        f'~ source.digest: "{SNAP.digest}" → "{rebaked.digest}"'
        in run_cli(["plan", ".", "-v"], project).stdout
    )
    _pin(project, document, snapshot_json, snapshot_text)


def test_removed_spec_deletes_only_what_cocoonplan_created(
    tmp_path: Path, snapshot_json: SnapshotAssertion, snapshot_text: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    (project / "agent-run.yaml").unlink()
    code, document = plan_json(project)
    assert code == 0
    run = vm_entry(document, "agent-run")
    assert run["action"] == "delete"
    assert run["vm_id"] == build.AGENT_RUN_ID
    assert "agent-run.yaml, which no longer defines it" in run["reason"]
    assert [w["vm"] for w in document["warnings"]] == ["legacy-tool"]
    assert "legacy-tool" not in {vm["name"] for vm in document["vms"]}
    _pin(project, document, snapshot_json, snapshot_text)


def test_a_foreign_vm_of_the_same_name_is_left_alone(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned(agent_run=None))
    (project / "agent-run.yaml").unlink()
    code, document = plan_json(project)
    assert code == 0
    assert "agent-run" not in {vm["name"] for vm in document["vms"]}
    warned = {w["vm"]: w["summary"] for w in document["warnings"]}
    assert "not created by cocoonplan; left alone" in warned["agent-run"]


def test_a_spec_over_a_foreign_vm_is_an_error(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned(agent_run=None))
    code, document = plan_json(project)
    assert code == 1
    (error,) = document["errors"]
    assert error["vm"] == "agent-run"
    assert "was not created by cocoonplan" in error["summary"]
    assert "agent-run" not in {vm["name"] for vm in document["vms"]}


def test_a_plan_only_deletes_within_the_planned_paths(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    (project / "agent-run.yaml").unlink()
    result = run_cli(["plan", "agent-clone.yaml", "--json"], project)
    assert result.exit_code == 0
    assert "agent-run" not in {vm["name"] for vm in json.loads(result.stdout)["vms"]}
    # The same plan over the whole project deletes it.
    assert vm_entry(plan_json(project)[1], "agent-run")["action"] == "delete"


def test_applied_files_that_changed_on_the_node_are_drift(tmp_path: Path) -> None:
    owners = _owned()
    clone_id = build.AGENT_CLONE_ID
    owners[clone_id] = dataclasses.replace(owners[clone_id], cmdline="console=hvc0 applied-elsewhere")
    project = _project(tmp_path, _healthy_vms(), owners)
    code, document = plan_json(project, "--refresh-only", "--detailed-exitcode")
    assert code == 2
    (drift,) = vm_entry(document, "agent-clone")["drift"]
    assert (drift["kind"], drift["path"]) == ("applied", ["cmdline"])
    assert drift["expected"] == "console=hvc0 applied-elsewhere"


def test_corrupted_metadata_is_a_clear_error_and_nothing_is_written(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    sqlite = ENGINE["metadata"] == "sqlite"
    root, damaged = (SQLITE_ROOT, "meta/meta.db") if sqlite else ("node", "cloudhypervisor/db/vms.json")
    path = project / root / damaged
    path.write_bytes(path.read_bytes()[:100])
    before = tree(project)
    result = run_cli(["plan", ".", "--out", "plan.json", "--root", f"node-a={root}"], project)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert damaged in result.stderr
    assert tree(project) == before


def test_plan_against_an_exported_state_equals_plan_against_the_root(tmp_path: Path) -> None:
    project = _project(tmp_path, list(SCENARIO_VMS), _owned())
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0
    against_root = run_cli(["plan", ".", "--json"], project).stdout
    (project / "node-state.json").write_text(exported.stdout)
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("state: node", "state: node-state.json"))
    shutil.rmtree(project / "node")
    assert run_cli(["plan", ".", "--json"], project).stdout == against_root


def test_show_prints_and_checks_the_plan_digest(tmp_path: Path) -> None:
    project = _project(tmp_path, list(SCENARIO_VMS), _owned())
    out = tmp_path / "plan.json"
    run_cli(["plan", ".", "--out", str(out)], project)
    saved = json.loads(out.read_text())
    shown = run_cli(["show", str(out)], project)
    assert shown.exit_code == 0
    assert saved["digest"] in shown.stdout.splitlines()[0]
    saved["vms"][0]["cpu"] = 64
    out.write_text(json.dumps(saved))
    tampered = run_cli(["show", str(out)], project)
    assert tampered.exit_code == 1
    assert "does not match its digest" in tampered.stderr


def test_root_and_state_options_name_where_a_node_is_read(tmp_path: Path) -> None:
    project = _project(tmp_path, list(SCENARIO_VMS), _owned())
    against_project = run_cli(["plan", ".", "--json"], project).stdout
    (project / "state.json").write_text(run_cli(["state", "export", "--root", "node"], project).stdout)
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("    state: node\n", ""))
    without = json.loads(run_cli(["plan", ".", "--json"], project).stdout)
    assert {vm["action"] for vm in without["vms"]} == {"unknown"}
    assert run_cli(["plan", ".", "--json", "--root", "node"], project).stdout == against_project
    assert run_cli(["plan", ".", "--json", "--state", "node-a=state.json"], project).stdout == against_project
    unknown = run_cli(["plan", ".", "--state", "node-z=state.json"], project)
    assert unknown.exit_code == 1
    assert "names node 'node-z', which the project file does not declare" in unknown.stderr


def test_a_spec_that_fails_to_resolve_never_deletes_its_vm(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    spec = project / "agent-clone.yaml"
    spec.write_text(spec.read_text().replace("agent-snap:v1", "agent-snap:v9"))
    code, document = plan_json(project)
    assert code == 1
    assert [e["vm"] for e in document["errors"]] == ["agent-clone"]
    assert "agent-clone" not in {vm["name"] for vm in document["vms"]}


def test_render_writes_nothing_for_a_vm_being_deleted(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    out = tmp_path / "rendered"
    assert run_cli(["render", ".", "--dir", str(out)], project).exit_code == 0
    assert (out / "node-a/agent-run/launch").is_file()
    (project / "agent-run.yaml").unlink()
    assert run_cli(["render", ".", "--dir", str(out)], project).exit_code == 0
    assert not (out / "node-a/agent-run/launch").exists()
    assert (out / "node-a/agent-clone/config.json").is_file()


def test_more_vcpus_than_the_node_has_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace("cpu: 2", "cpu: 32"))
    code, document = plan_json(project)
    assert code == 1
    (error,) = document["errors"]
    assert error["summary"] == "VM agent-run: cpu 32 is more than the node's 16 CPUs"


def test_a_spec_moved_outside_the_planned_paths_keeps_its_vm(tmp_path: Path) -> None:
    owners = _owned()
    run_id = build.AGENT_RUN_ID
    owners[run_id] = dataclasses.replace(owners[run_id], spec_file="planned/agent-run.yaml")
    project = _project(tmp_path, _healthy_vms(), owners)
    (project / "planned").mkdir()
    (project / "agent-clone.yaml").rename(project / "planned" / "agent-clone.yaml")
    (project / "moved").mkdir()
    (project / "agent-run.yaml").rename(project / "moved" / "agent-run.yaml")
    # Applied from planned/agent-run.yaml, whose spec now lives in moved/: planning planned/
    # alone must not delete it, for a spec elsewhere in the project still defines it.
    result = run_cli(["plan", "planned", "--json"], project)
    assert result.exit_code == 0
    assert "agent-run" not in {vm["name"] for vm in json.loads(result.stdout)["vms"]}
    (project / "moved" / "agent-run.yaml").unlink()
    gone = json.loads(run_cli(["plan", "planned", "--json"], project).stdout)
    assert {vm["name"]: vm["action"] for vm in gone["vms"]}["agent-run"] == "delete"


def test_the_api_plans_the_working_directory_when_given_no_paths(tmp_path: Path) -> None:
    from cocoonplan import api

    project = _project(tmp_path, _healthy_vms(), _owned())
    plan = api.plan([], api.Environment(env={}, cwd=project))
    assert {vm.name: vm.action.value for vm in plan.vms} == {"agent-clone": "no-op", "agent-run": "no-op"}


def test_rendering_part_of_the_project_keeps_the_other_vms_files(tmp_path: Path) -> None:
    project = _project(tmp_path, _healthy_vms(), _owned())
    out = tmp_path / "rendered"
    assert run_cli(["render", ".", "--dir", str(out)], project).exit_code == 0
    assert run_cli(["render", "agent-clone.yaml", "--dir", str(out), "--check"], project).exit_code == 0
    assert run_cli(["render", "agent-clone.yaml", "--dir", str(out)], project).exit_code == 0
    assert (out / "node-a/agent-run/launch").is_file()
