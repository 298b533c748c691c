"""Lifecycle, identity and clones as cocoon runs them: no false replace.

Each case builds a node root with cocoon's real file formats (``ocifixture.node_root``), as
cocoon leaves it after ``vm stop``, ``vm start``, ``vm restore`` or a clone, and plans the
shipped example specs against it. Where a case is a state a user reaches by hand, it edits a
copy of ``examples/`` the way cocoon would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from chschema import request_errors
from clirunner import copy_examples, example_builder, plan_json, run_cli, vm_entry
from ocifixture import Clone, NodeVM, OwnerRecord, node_root, snapshot, write_layout
from snapshotext import JSONFile

build = example_builder()
ARTIFACTS, SCENARIO_VMS = build.scenario()
SNAP = ARTIFACTS[build.AGENT_SNAP]
IMAGES = {k: v for k, v in ARTIFACTS.items() if k != build.AGENT_SNAP}
REQUEST_SCHEMAS = {
    "vm.restore": "RestoreConfig",
    "vm.remove-device": "VmRemoveDevice",
    "vm.add-net": "NetConfig",
}


def _vms(**changes: dict[str, Any]) -> list[NodeVM]:
    """The example node's VMs, agent-clone on its snapshot's own layers, with per-VM changes."""
    vms = []
    for vm in SCENARIO_VMS:
        update: dict[str, Any] = {"layers": None} if vm.name == "agent-clone" else {}
        vms.append(dataclasses.replace(vm, **update | changes.get(vm.name.replace("-", "_"), {})))
    return vms


def _project(
    tmp_path: Path, vms: list[NodeVM], owned: dict[str, OwnerRecord] | None = None, **extra: Any
) -> Path:
    project = copy_examples(tmp_path / "examples")
    shutil.rmtree(project / "node")
    ids = {vm.id for vm in vms}
    owners = {i: o for i, o in (build.owned(ARTIFACTS) if owned is None else owned).items() if i in ids}
    node_root(project / "node", images=IMAGES, vms=vms, owned=owners, **extra)
    return project


def _set_spec(project: Path, file: str, line: str) -> None:
    """Add ``line`` (indented under ``spec:``) to a spec file."""
    spec = project / file
    spec.write_text(spec.read_text() + f"  {line}\n")


@pytest.fixture
def snapshot_json(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(JSONFile)


# --------------------------------------------------------------------------- power state


def test_a_stopped_vm_whose_spec_says_running_is_started(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms(agent_run={"state": "stopped"}))
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 2
    run = vm_entry(document, "agent-run")
    assert (run["action"], run["observed_state"], run["state"]) == ("start", "stopped", "running")
    assert run["drift"] == [] and run["changes"] == []
    assert run["vm_id"] == build.AGENT_RUN_ID and run["provisional"] == []
    assert document["summary"]["start"] == 1 and document["summary"]["replace"] == 0
    human = run_cli(["plan", "."], project).stdout
    assert ">   agent-run on node-a (run, agent-run.yaml) will be started" in human
    assert "1 to start" in human
    assert run == snapshot_json


def test_a_stopped_vm_whose_spec_says_stopped_is_a_no_op(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms(agent_run={"state": "stopped"}))
    _set_spec(project, "agent-run.yaml", "state: stopped")
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 0
    run = vm_entry(document, "agent-run")
    assert (run["action"], run["state"], run["drift"]) == ("no-op", "stopped", [])
    assert run == snapshot_json


def test_a_running_vm_whose_spec_says_stopped_is_stopped(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms())
    _set_spec(project, "agent-run.yaml", "state: stopped")
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 2
    run = vm_entry(document, "agent-run")
    assert (run["action"], run["observed_state"], run["changes"]) == ("stop", "running", [])
    assert (
        "||  agent-run on node-a (run, agent-run.yaml) will be stopped"
        in run_cli(["plan", "."], project).stdout
    )
    assert run == snapshot_json


def test_a_vm_in_cocoons_error_state_is_unknown_not_replaced(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms(agent_run={"state": "error"}))
    _, document = plan_json(project)
    run = vm_entry(document, "agent-run")
    assert run["action"] == "unknown"
    assert "'error'" in run["reason"] and "cocoon vm inspect" in run["reason"]
    assert run == snapshot_json


def test_agent_run_stopped_by_hand_in_the_examples_is_a_start(tmp_path: Path) -> None:
    # What `cocoon vm stop` does to the shipped node: state stopped, runtime files deleted.
    project = copy_examples(tmp_path / "examples")
    vms_json = project / "node/cloudhypervisor/db/vms.json"
    records = json.loads(vms_json.read_text())
    records["vms"][build.AGENT_RUN_ID]["state"] = "stopped"
    vms_json.write_text(json.dumps(records))
    (project / f"node/run/cloudhypervisor/{build.AGENT_RUN_ID}/cmdline").unlink()
    _, document = plan_json(project)
    run = vm_entry(document, "agent-run")
    assert (run["action"], run["drift"]) == ("start", [])


# --------------------------------------------------------------------------- runtime files


def test_a_clone_restarted_with_stop_and_start_is_a_no_op(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms(agent_clone={"started_by": "start"}))
    launch = (project / f"node/run/cloudhypervisor/{build.AGENT_CLONE_ID}/cmdline").read_text()
    assert launch.startswith("cloud-hypervisor --api-socket") and " --kernel " in launch
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 0
    clone = vm_entry(document, "agent-clone")
    assert (clone["action"], clone["drift"], clone["changes"]) == ("no-op", [], [])
    assert clone == snapshot_json


def test_a_stopped_clone_is_started_by_a_cold_boot_from_its_record(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms(agent_clone={"state": "stopped"}))
    _, document = plan_json(project)
    clone = vm_entry(document, "agent-clone")
    assert clone["action"] == "start"
    # cocoon vm start cold-boots a clone: the full argument list, no restore.
    assert clone["restore"] == []
    assert clone["launch"][clone["launch"].index("--cmdline") + 1] == clone["cmdline"]
    assert "cold-boots" in " ".join(clone["notes"])
    assert clone == snapshot_json


def test_a_restored_run_vm_is_a_no_op_and_stays_a_run(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, _vms(agent_run={"started_by": "restore"}))
    run_dir = project / f"node/run/cloudhypervisor/{build.AGENT_RUN_ID}"
    assert (run_dir / "cocoon.json").is_file() and (run_dir / "config.json").is_file()
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 0
    run = vm_entry(document, "agent-run")
    assert (run["action"], run["mode"], run["drift"], run["changes"]) == ("no-op", "run", [], [])
    # Refresh-only classifies it from the node alone: a run that was restored, not a clone.
    refreshed = vm_entry(plan_json(project, "--refresh-only")[1], "agent-run")
    assert (refreshed["mode"], refreshed["drift"]) == ("run", [])
    assert run == snapshot_json


def test_a_clone_restored_from_its_own_snapshot_is_a_no_op_and_stays_a_clone(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    # What cocoonplan recorded at clone: the config.json cocoon patched then.
    cloned = _project(tmp_path / "cloned", _vms())
    applied = (cloned / f"node/run/cloudhypervisor/{build.AGENT_CLONE_ID}/config.json").read_bytes()
    owners = build.owned(ARTIFACTS)
    owners[build.AGENT_CLONE_ID] = dataclasses.replace(
        owners[build.AGENT_CLONE_ID], config_sha256="sha256:" + hashlib.sha256(applied).hexdigest()
    )
    restored = _vms(agent_clone={"started_by": "restore"}, agent_run={"started_by": "restore"})
    project = _project(tmp_path / "restored", restored, owners)
    run_dir = f"/var/lib/cocoon/run/cloudhypervisor/{build.AGENT_CLONE_ID}"
    # As `cocoon vm restore` leaves it: a sidecar naming the clone's own disks, the snapshot
    # recorded in snapshot_ids, the API socket alone, and CH's config.json of the clone itself.
    files = project / f"node/run/cloudhypervisor/{build.AGENT_CLONE_ID}"
    sidecar = json.loads((files / "cocoon.json").read_text())
    assert all(c["path"].startswith(run_dir) for c in sidecar["storage_configs"] if c["role"] != "layer")
    assert (files / "cmdline").read_text() == f"cloud-hypervisor --api-socket {run_dir}/api.sock"
    assert (files / "config.json").read_bytes() != applied
    records = json.loads((project / "node/cloudhypervisor/db/vms.json").read_text())["vms"]
    assert records[build.AGENT_CLONE_ID]["snapshot_ids"] == {"SNAPOFITSELFAAAAAAAAAAAAAA": {}}

    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 0
    clone = vm_entry(document, "agent-clone")
    assert (clone["action"], clone["mode"], clone["drift"], clone["changes"]) == ("no-op", "clone", [], [])
    refreshed = vm_entry(plan_json(project, "--refresh-only")[1], "agent-clone")
    assert (refreshed["mode"], refreshed["drift"]) == ("clone", [])
    # Without cocoonplan's record the node alone tells them apart: the restored clone's guest
    # still runs its source's cmdline, the restored run's its own.
    foreign = _project(tmp_path / "foreign", restored, owned={})
    modes = {vm["name"]: vm["mode"] for vm in plan_json(foreign, "--refresh-only")[1]["vms"]}
    assert (modes["agent-clone"], modes["agent-run"]) == ("clone", "run")
    assert clone == snapshot_json


def test_a_launch_line_cocoon_would_not_write_is_drift(tmp_path: Path) -> None:
    run_dir = f"run/cloudhypervisor/{build.AGENT_CLONE_ID}"
    project = _project(
        tmp_path, _vms(), extra_files={f"{run_dir}/cmdline": b"cloud-hypervisor --api-socket /elsewhere"}
    )
    code, document = plan_json(project, "--refresh-only", "--detailed-exitcode")
    assert code == 2
    (drift,) = vm_entry(document, "agent-clone")["drift"]
    assert drift["path"] == ["launch"] and drift["found"] == "cloud-hypervisor --api-socket /elsewhere"
    assert f"cloud-hypervisor --api-socket /var/lib/cocoon/{run_dir}/api.sock" in drift["expected"]
    # Stopped, the same VM's runtime files say nothing, even a stale cmdline left behind (cocoon's
    # stop deletes it, so whatever is there is not what runs): it is judged only while running.
    stopped = _project(
        tmp_path / "stopped",
        _vms(agent_clone={"state": "stopped"}),
        extra_files={f"{run_dir}/cmdline": b"cloud-hypervisor --api-socket /elsewhere"},
    )
    assert (stopped / f"node/{run_dir}/cmdline").read_bytes() == b"cloud-hypervisor --api-socket /elsewhere"
    assert vm_entry(plan_json(stopped, "--refresh-only")[1], "agent-clone")["drift"] == []


# --------------------------------------------------------------------------- networks


def _with_network(project: Path, node_setting: str | None) -> None:
    """Set node-a's line ``defaultNetwork: cocoon`` (as the examples declare it) to
    ``node_setting``; None removes it, leaving node-a's default network unknown."""
    config = project / "cocoonplan.yaml"
    text = config.read_text()
    line = next(
        line for line in text.splitlines(keepends=True) if line.startswith("    defaultNetwork: cocoon")
    )
    config.write_text(text.replace(line, f"    {node_setting}\n" if node_setting else "", 1))


@pytest.mark.parametrize(
    ("node_setting", "action"),
    [
        pytest.param(None, "no-op", id="default-unknown"),
        pytest.param("defaultNetwork: cocoon", "no-op", id="default-cocoon"),
        pytest.param("defaultNetwork: other", "replace", id="default-other"),
    ],
)
def test_a_record_naming_the_default_network_is_no_change(
    tmp_path: Path, node_setting: str | None, action: str, snapshot_json: SnapshotAssertion
) -> None:
    vms = _vms(agent_run={"network": "cocoon"}, agent_clone={"network": "cocoon"})
    project = _project(tmp_path, vms)
    _with_network(project, node_setting)
    _, document = plan_json(project)
    for name in ("agent-run", "agent-clone"):
        vm = vm_entry(document, name)
        assert vm["action"] == action, vm["reason"]
        if action == "replace":
            assert [(c["kind"], c["path"], c["before"], c["after"]) for c in vm["changes"]] == [
                ("network", ["network"], "cocoon", "other")
            ]
    # An unknown default is no reason to change, and the plan says what it did not compare.
    unknown = [w for w in document["warnings"] if "default network is not known" in w["summary"]]
    if node_setting is None:
        assert sorted(w["vm"] for w in unknown) == ["agent-clone", "agent-run"]
        run = next(w["summary"] for w in unknown if w["vm"] == "agent-run")
        assert run == (
            "the network of VM agent-run on node node-a is not compared (its record names 'cocoon'): "
            "the node's default network is not known; set defaultNetwork or cniConfDir for node node-a "
            "in cocoonplan.yaml"
        )
    else:
        assert unknown == []
    pinned = {name: vm_entry(document, name) for name in ("agent-run", "agent-clone")}
    assert {"vms": pinned, "warnings": document["warnings"]} == snapshot_json


# --------------------------------------------------------------------------- unknown nodes


def test_a_node_without_state_is_unknown_and_nothing_is_created_or_deleted(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = copy_examples(tmp_path / "examples")
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("    state: node\n", "    cocoonVersion: v0.3.8\n"))
    (project / "agent-run.yaml").unlink()  # would be a delete on a known node
    code, document = plan_json(project, "--detailed-exitcode")
    assert code == 2
    assert [(vm["name"], vm["action"]) for vm in document["vms"]] == [("agent-clone", "unknown")]
    (warning,) = document["warnings"]
    assert "state of node node-a is not known" in warning["summary"]
    assert "--assume-empty-node node-a" in warning["hint"]
    assert document["summary"]["unknown"] == 1 and document["summary"]["create"] == 0
    assert document["vms"][0] == snapshot_json
    assumed = plan_json(project, "--assume-empty-node", "node-a")[1]
    assert [(vm["name"], vm["action"]) for vm in assumed["vms"]] == [("agent-clone", "create")]
    clone = assumed["vms"][0]
    assert {"vm_id", "interfaces[0].mac", "interfaces[0].tap", "launch[2]", "cmdline"} <= set(
        clone["provisional"]
    )
    assert all(not b["present"] for b in clone["blobs"])
    assert clone == snapshot_json


def test_assume_empty_node_refuses_a_node_whose_state_is_known(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples")
    result = run_cli(["plan", ".", "--assume-empty-node", "node-a"], project)
    assert result.exit_code == 1
    assert "node's state is known" in result.stderr
    unknown = run_cli(["plan", ".", "--assume-empty-node", "node-z"], project)
    assert unknown.exit_code == 1 and "does not declare" in unknown.stderr
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("    state: node\n", ""))
    versionless = run_cli(["plan", ".", "--assume-empty-node", "node-a"], project)
    assert versionless.exit_code == 1 and "set cocoonVersion for node-a" in versionless.stderr


# --------------------------------------------------------------------------- identity


def test_a_create_lists_every_value_cocoon_draws_as_provisional(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, [vm for vm in _vms() if vm.name != "agent-run"])
    _, document = plan_json(project)
    run = vm_entry(document, "agent-run")
    assert run["action"] == "create"
    provisional = set(run["provisional"])
    cow = next(d for d in run["disks"] if d["role"] == "cow")
    assert {"vm_id", f"disks[{cow['index']}].path", "interfaces[0].tap", "interfaces[0].mac"} <= provisional
    assert {f"config.disks[{cow['index']}].path", "config.net[0].mac", "config.net[0].tap"} <= provisional
    assert {"interfaces[0].address", "cmdline"} <= provisional
    # CNI adds ip= to the cmdline, so every copy of it is provisional too: the launch's
    # --cmdline value and the derived VmConfig's payload.
    cmdline_at = run["launch"].index("--cmdline") + 1
    assert run["launch"][cmdline_at] == run["config"]["payload"]["cmdline"] == run["cmdline"]
    assert {f"launch[{cmdline_at}]", "config.payload.cmdline"} <= provisional
    # Layer paths are content-addressed, not drawn: never provisional.
    assert not any(p.startswith("disks[0]") for p in provisional)
    assert any("ip=" in note for note in run["notes"])
    assert f"new vm id {run['vm_id']} *" in run_cli(["plan", "."], project).stdout
    assert f"vm id:      {run['vm_id']} *" in run_cli(["plan", ".", "-v"], project).stdout
    assert run == snapshot_json


def test_a_replace_plans_a_new_provisional_identity(tmp_path: Path, snapshot_json: SnapshotAssertion) -> None:
    # The founding scenario: agent-clone runs on another image's six layers.
    project = _project(tmp_path, list(SCENARIO_VMS))
    _, document = plan_json(project)
    clone = vm_entry(document, "agent-clone")
    assert clone["action"] == "replace"
    assert clone["vm_id"] != build.AGENT_CLONE_ID and "vm_id" in clone["provisional"]
    cow = next(d for d in clone["disks"] if d["role"] == "cow")
    assert clone["vm_id"] in cow["path"] and build.AGENT_CLONE_ID not in json.dumps(clone["restore"])
    node_nic = next(vm for vm in SCENARIO_VMS if vm.name == "agent-clone").nics[0]
    assert clone["interfaces"][0]["address"] is None and node_nic.ip not in clone["cmdline"]
    # The changes still compare like with like: nothing but the real differences.
    assert not any(c["path"][0] in ("vm_id", "nics") for c in clone["changes"])
    assert {k: clone[k] for k in ("vm_id", "provisional", "interfaces", "restore", "launch")} == snapshot_json


# --------------------------------------------------------------------------- clones as cocoon runs them


def test_a_clones_restore_sequence_validates_against_the_ch_schema(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, [vm for vm in _vms() if vm.name != "agent-clone"])
    _, document = plan_json(project)
    clone = vm_entry(document, "agent-clone")
    assert clone["action"] == "create"
    run_dir = f"/var/lib/cocoon/run/cloudhypervisor/{clone['vm_id']}"
    assert clone["launch"] == ["cloud-hypervisor", "--api-socket", f"{run_dir}/api.sock"]
    endpoints = [r["endpoint"] for r in clone["restore"]]
    assert endpoints == ["vm.restore", "vm.remove-device", "vm.add-net", "vm.resume"]
    for request in clone["restore"]:
        if request["endpoint"] == "vm.resume":
            assert request["body"] is None
        else:
            assert request_errors(REQUEST_SCHEMAS[request["endpoint"]], request["body"]) == []
    restore, remove, add, _ = clone["restore"]
    assert restore["body"] == {"source_url": f"file://{run_dir}"}
    # The snapshot's NIC (its ID after eleven layers, cow and data disk) goes; the clone's comes.
    assert remove["body"] == {"id": "_net13"} and clone["config"]["net"][0]["id"] == "_net13"
    nic = clone["interfaces"][0]
    assert (add["body"]["tap"], add["body"]["mac"]) == (nic["tap"], nic["mac"])
    assert nic["mac"] != clone["config"]["net"][0]["mac"], "config.json keeps the source's NIC until the swap"
    assert any("resumed guest keeps the source VM" in n for n in clone["notes"])
    # The cmdline recorded for the next cold boot gets the lease's ip=; config.json keeps the
    # source's payload, which cocoon does not patch: not drawn, not provisional.
    assert "cmdline" in clone["provisional"]
    assert "--cmdline" not in clone["launch"]
    assert not any(p.startswith("config.payload") for p in clone["provisional"])
    assert clone == snapshot_json


def test_an_on_demand_restore_sends_cocoons_mode_and_says_what_v51_lacks(tmp_path: Path) -> None:
    project = _project(tmp_path, [vm for vm in _vms() if vm.name != "agent-clone"])
    _set_spec(project, "agent-clone.yaml", "restoreMode: ondemand")
    clone = vm_entry(plan_json(project)[1], "agent-clone")
    assert clone["restore"][0]["body"]["memory_restore_mode"] == "OnDemand"
    assert request_errors("RestoreConfig", clone["restore"][0]["body"]) == [
        "memory_restore_mode: not defined by RestoreConfig"
    ]
    assert any("memory_restore_mode" in n for n in clone["notes"])


def test_a_local_snapshots_queue_sizes_and_direct_io_are_inherited(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    baked = {
        "id": "S2JHTLGMXGEDN73U55XTPLPFT7",  # the snapshot the artifact was pushed from
        "name": "agent-src-snap",
        "queue_size": 1024,
        "disk_queue_size": 256,
        "no_direct_io": True,
        "created_at": "2026-05-14T09:12:33Z",
    }
    vms = [vm for vm in _vms() if vm.name != "agent-clone"]
    project = _project(tmp_path, vms, snapshots={baked["id"]: baked})
    clone = vm_entry(plan_json(project)[1], "agent-clone")
    assert clone["local_snapshot"] == {"id": baked["id"], "name": "agent-src-snap"}
    assert {d["queue_size"] for d in clone["config"]["disks"]} == {256}
    assert not any(d["direct"] for d in clone["config"]["disks"])
    assert clone["interfaces"][0]["queue_size"] == 1024
    _set_spec(project, "agent-clone.yaml", "diskQueueSize: 128")
    _set_spec(project, "agent-clone.yaml", "noDirectIO: false")
    overridden = vm_entry(plan_json(project)[1], "agent-clone")
    assert {d["queue_size"] for d in overridden["config"]["disks"]} == {128}
    assert any(d["direct"] for d in overridden["config"]["disks"])
    assert clone == snapshot_json


# --------------------------------------------------------------------------- what cocoon checks at create


def test_a_missing_kernel_the_base_image_provides_is_planned_for_extraction(tmp_path: Path) -> None:
    kernel_hex = SNAP.snapshot.kernel_hex
    project = _project(tmp_path, [vm for vm in _vms() if vm.name != "agent-clone"])
    (project / f"node/oci/boot/{kernel_hex}/vmlinuz").unlink()
    clone = vm_entry(plan_json(project)[1], "agent-clone")
    kernel = next(b for b in clone["boot_files"] if b["path"].endswith("/vmlinuz"))
    assert (kernel["present"], kernel["layer"]) == (False, f"sha256:{kernel_hex}")


def test_a_clone_whose_kernel_cocoon_cannot_find_is_an_error_naming_the_path(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    # A snapshot whose config.json boots a kernel from a layer that is not its base's kernel layer
    # (re-baked by hand), on a node that lacks that file: cocoon's VerifyBaseFiles would refuse it.
    xface = ARTIFACTS[build.XFACE]
    stray = xface.layers[4].hex
    rebaked = snapshot(
        xface,
        base_ref=build.XFACE,
        vm=SNAP.snapshot.vm,
        snapshot_id="R3BAKEDSNAPSH0TAAAAAAAAAAA",
        kernel_override=stray,
    )
    project = _project(tmp_path, [vm for vm in _vms() if vm.name != "agent-clone"])
    write_layout(project / "oci", {**ARTIFACTS, build.AGENT_SNAP: rebaked})
    assert run_cli(["lock", ".", "--update"], project).exit_code == 0
    result = run_cli(["plan", ".", "--json"], project)
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    (error,) = document["errors"]
    assert error["vm"] == "agent-clone"
    assert f"/var/lib/cocoon/oci/boot/{stray}/vmlinuz is not on node" in error["summary"]
    assert "verify base files" in error["hint"]
    assert "agent-clone" not in [vm["name"] for vm in document["vms"]]
    assert {k: document[k] for k in ("errors", "warnings", "summary")} == snapshot_json


def test_a_run_plans_the_image_record_and_boot_files_it_needs(tmp_path: Path) -> None:
    image = ARTIFACTS[build.XFACE_0513]
    on_node = vm_entry(plan_json(_project(tmp_path, _vms()))[1], "agent-run")
    assert on_node["image_record"]["key"] == build.XFACE_0513
    assert on_node["image_record"]["present"] is True
    assert all(b["present"] for b in on_node["boot_files"])
    project = copy_examples(tmp_path / "empty")
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("    state: node\n", "    cocoonVersion: v0.3.8\n"))
    fresh = vm_entry(plan_json(project, "--assume-empty-node", "node-a")[1], "agent-run")
    repository = build.XFACE_0513.rsplit(":", 1)[0]
    assert fresh["image_record"]["key"] == f"{repository}@{image.digest}"
    assert fresh["image_record"]["present"] is False
    assert [b["present"] for b in fresh["boot_files"]] == [False, False]
    assert fresh["config_origin"] == "derived"


def test_config_keys_beyond_v51_are_no_change(tmp_path: Path) -> None:
    # A fork's extra config.json key: the node's copy is read without it (only VmConfig keys,
    # so nothing unmodelled leaks), so the plan must compare its own config the same way.
    source = dataclasses.replace(SNAP.snapshot.vm, ch_extra=(("fork_feature", {"token": "s3cr3t"}),))
    baked = snapshot(
        ARTIFACTS[build.XFACE], base_ref=build.XFACE, vm=source, snapshot_id="S2JHTLGMXGEDN73U55XTPLPFT7"
    )
    vms = [dataclasses.replace(vm, source=Clone(baked)) if vm.name == "agent-clone" else vm for vm in _vms()]
    owners = build.owned({**ARTIFACTS, build.AGENT_SNAP: baked})
    project = _project(tmp_path, vms, owners)
    write_layout(project / "oci", {**ARTIFACTS, build.AGENT_SNAP: baked})
    assert run_cli(["lock", ".", "--update"], project).exit_code == 0
    _, document = plan_json(project)
    planned = vm_entry(document, "agent-clone")
    assert (planned["action"], planned["changes"], planned["drift"]) == ("no-op", [], [])


@pytest.mark.parametrize(
    ("vms", "spec_line", "name", "reason"),
    [
        ({"agent_run": {"state": "stopped"}}, None, "agent-run", "start_because_stopped"),
        ({}, "state: stopped", "agent-run", "stop_because_spec_stopped"),
        ({"agent_run": {"state": "error"}}, None, "agent-run", "unknown_because_vm_state"),
        ({}, "nics: 2", "agent-run", "replace_because_resources_changed"),
        ({}, None, "agent-run", "no_op_as_planned"),
    ],
)
def test_every_action_carries_its_reason(
    tmp_path: Path, vms: dict[str, dict[str, Any]], spec_line: str | None, name: str, reason: str
) -> None:
    project = _project(tmp_path, _vms(**vms))
    if spec_line:
        _set_spec(project, f"{name}.yaml", spec_line)
    _, document = plan_json(project)
    assert vm_entry(document, name)["action_reason"] == reason
    founding = vm_entry(plan_json(_project(tmp_path / "founding", list(SCENARIO_VMS)))[1], "agent-clone")
    assert founding["action_reason"] == "replace_because_layers_drifted"
    assert any(lost.startswith("cow disk ") for lost in founding["destroys"])
