"""Plans per cocoon release line: v0.3.8 as the reference documents it, the v0.6 line as
``cocoon-later.md`` does. The same example specs are planned against nodes that run each."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from chschema import config_errors, request_errors
from clirunner import copy_examples, example_builder, plan_json, run_cli, vm_entry
from ocifixture import node_root, snapshot, write_layout
from snapshotext import JSONFile

build = example_builder()
ARTIFACTS, SCENARIO_VMS = build.scenario()
SNAP = ARTIFACTS[build.AGENT_SNAP]
IMAGES = {k: v for k, v in ARTIFACTS.items() if k != build.AGENT_SNAP}


def _project(tmp_path: Path, *settings: str, vsock: bool = False) -> Path:
    """The examples on a node with only legacy-tool (so both specs are creates), the node's
    project settings extended with ``settings``; ``vsock``: the snapshot was baked on a v0.6 node."""
    project = copy_examples(tmp_path / "examples")
    shutil.rmtree(project / "node")
    node_root(project / "node", images=IMAGES, vms=[vm for vm in SCENARIO_VMS if vm.name == "legacy-tool"])
    if vsock:
        source = dataclasses.replace(SNAP.snapshot.vm, vsock=True)
        baked = snapshot(
            ARTIFACTS[build.XFACE], base_ref=build.XFACE, vm=source, snapshot_id="S2JHTLGMXGEDN73U55XTPLPFT7"
        )
        write_layout(project / "oci", {**ARTIFACTS, build.AGENT_SNAP: baked})
        assert run_cli(["lock", ".", "--update"], project).exit_code == 0
    config = project / "cocoonplan.yaml"
    extra = "".join(f"    {line}\n" for line in settings)
    config.write_text(config.read_text().replace("    cpus: 16\n", f"    cpus: 16\n{extra}"))
    return project


def _spec(project: Path, file: str, line: str) -> None:
    spec = project / file
    spec.write_text(spec.read_text() + f"  {line}\n")


@pytest.fixture
def snapshot_json(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(JSONFile)


def test_the_plan_names_each_nodes_cocoon_and_how_it_was_learnt(tmp_path: Path) -> None:
    detected = plan_json(_project(tmp_path / "a"))[1]["nodes"]
    assert detected == [
        {
            "name": "node-a",
            "cocoon": {"version": "v0.3.8", "line": "v0.3", "source": "detected"},
            "cloud_hypervisor": "upstream",
            "state_known": True,
        }
    ]
    project = _project(tmp_path / "b", "cocoonVersion: v0.6.4")
    assert plan_json(project)[1]["nodes"][0]["cocoon"] == {
        "version": "v0.6.4",
        "line": "v0.6",
        "source": "setting",
    }
    assert (
        "node node-a: cocoon v0.6.4 (setting, planned by the v0.6 rules)"
        in run_cli(["plan", "."], project).stdout
    )


@pytest.mark.parametrize("version", ["v0.5.8", "v0.4.3", "v0.3.7", "v0.7.0", "unknown"])
def test_a_version_without_rules_is_refused_naming_it(tmp_path: Path, version: str) -> None:
    project = _project(tmp_path, f"cocoonVersion: {version}")
    result = run_cli(["plan", "."], project)
    assert result.exit_code == 1
    assert "cocoonplan.yaml:" in result.stderr and version in result.stderr
    assert result.stderr.count("\n") <= 4 and "Traceback" not in result.stderr


def test_an_exported_version_without_rules_is_refused_naming_it(tmp_path: Path) -> None:
    project = _project(tmp_path)
    exported = json.loads(run_cli(["state", "export", "--root", "node"], project).stdout)
    (project / "state.json").write_text(json.dumps(exported | {"cocoon_version": "v0.9.1"}))
    result = run_cli(["plan", ".", "--state", "node-a=state.json"], project)
    assert result.exit_code == 1
    assert "node node-a: cocoon v0.9.1 is not supported" in result.stderr


def test_v0_3_clone_configs_stay_as_the_reference_writes_them(tmp_path: Path) -> None:
    detected = vm_entry(plan_json(_project(tmp_path / "a"))[1], "agent-clone")
    pinned = vm_entry(plan_json(_project(tmp_path / "b", "cocoonVersion: v0.3.8"))[1], "agent-clone")
    assert detected["config"] == pinned["config"]
    assert pinned["config"]["net"][0]["tap"] == SNAP.snapshot.vm.nics[0].tap
    assert "id" not in pinned["restore"][2]["body"]


def test_a_v0_6_clone_is_patched_and_restored_as_the_current_line_does(
    tmp_path: Path, snapshot_json: SnapshotAssertion
) -> None:
    project = _project(tmp_path, "cocoonVersion: v0.6.4", vsock=True)
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    clone = vm_entry(document, "agent-clone")
    source = json.loads(SNAP.file("config.json"))
    run_dir = f"/var/lib/cocoon/run/cloudhypervisor/{clone['vm_id']}"
    # TAPs renamed to throwaway names, the vsock socket moved, CPU/memory/balloon untouched.
    assert [n["tap"] for n in clone["config"]["net"]] == [f"rm{clone['vm_id'][:8]}-0"]
    assert clone["config"]["vsock"]["socket"] == f"{run_dir}/vsock.uds"
    assert clone["config"]["vsock"]["id"] == "_vsock0"
    for key in ("cpus", "memory", "balloon"):
        assert list(clone["config"][key].items()) == list(source[key].items()), key
    assert config_errors(clone["config"]) == []
    # Stock Cloud Hypervisor: copy, not cocoon's default mmap; the NIC comes back named by its MAC.
    assert clone["restore_mode"] == "copy"
    restore, remove, add, _ = clone["restore"]
    assert "memory_restore_mode" not in restore["body"]
    assert add["body"]["id"] == "cocoon-net-" + clone["interfaces"][0]["mac"].replace(":", "")
    for request, schema in ((restore, "RestoreConfig"), (remove, "VmRemoveDevice"), (add, "NetConfig")):
        assert request_errors(schema, request["body"]) == []
    assert any("stock build" in n for n in clone["notes"])
    assert any("fresh MAC and no IPv4" in n for n in clone["notes"])
    assert "rm" + clone["vm_id"][:8] + "-0" in json.dumps(clone["config"])
    assert {"config.net[0].tap", "config.vsock.socket"} <= set(clone["provisional"])
    assert clone == snapshot_json


def test_mmap_is_used_only_where_cloud_hypervisor_accepts_it(tmp_path: Path) -> None:
    fork = _project(tmp_path / "fork", "cocoonVersion: v0.6.4", "cloudHypervisor: cocoonstack")
    clone = vm_entry(plan_json(fork)[1], "agent-clone")
    assert clone["restore_mode"] == "mmap"
    assert clone["restore"][0]["body"]["memory_restore_mode"] == "CopyOnWrite"
    stock = _project(tmp_path / "stock", "cocoonVersion: v0.6.4")
    _spec(stock, "agent-clone.yaml", "restoreMode: mmap")
    code, document = plan_json(stock)
    assert code == 1
    (error,) = document["errors"]
    assert "CopyOnWrite" in error["summary"] and "cloudHypervisor: cocoonstack" in error["hint"]
    old = _project(tmp_path / "old")
    _spec(old, "agent-clone.yaml", "restoreMode: mmap")
    (error,) = plan_json(old)[1]["errors"]
    assert "needs cocoon v0.6" in error["summary"]


def test_a_v0_6_clone_cannot_be_resized(tmp_path: Path) -> None:
    project = _project(tmp_path, "cocoonVersion: v0.6.4")
    _spec(project, "agent-clone.yaml", "cpu: 4")
    code, document = plan_json(project)
    assert code == 1
    (error,) = document["errors"]
    assert error["vm"] == "agent-clone"
    assert "cpu 4 differs from the snapshot's 2" in error["summary"]
    assert "v0.6 clones with the snapshot's own cpu" in error["summary"]
    # v0.3.8 grows it.
    old = _project(tmp_path / "old")
    _spec(old, "agent-clone.yaml", "cpu: 4")
    assert vm_entry(plan_json(old)[1], "agent-clone")["config"]["cpus"]["boot_vcpus"] == 4


def test_a_v0_6_run_launches_with_vsock_and_host_chosen_affinity(tmp_path: Path) -> None:
    project = _project(tmp_path, "cocoonVersion: v0.6.4", "hugepages: true")
    run = vm_entry(plan_json(project)[1], "agent-run")
    launch: list[str] = run["launch"]
    run_dir = f"/var/lib/cocoon/run/cloudhypervisor/{run['vm_id']}"
    vsock = launch.index("--vsock")
    assert launch[vsock + 1] == f"cid=3,socket={run_dir}/vsock.uds"
    assert launch[vsock + 2] == "--serial" and launch[vsock - 2] == "--balloon"
    # hugepages only with --hugepages on the current line, never from the host.
    assert launch[launch.index("--memory") + 1] == f"size={run['memory']}"
    assert run["config"]["vsock"] == {
        "cid": 3,
        "socket": f"{run_dir}/vsock.uds",
        "iommu": False,
        "id": None,
        "pci_segment": 0,
    }
    affinity = [f"launch[{i}]" for i, arg in enumerate(launch) if "queue_affinity=" in arg]
    assert affinity and set(affinity) <= set(run["provisional"])
    assert any("live host load" in n for n in run["notes"])
    assert config_errors(run["config"]) == []


def test_a_running_v0_6_vm_whose_affinity_cocoon_chose_shows_no_drift(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples")
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace("    cpus: 16\n", "    cpus: 16\n    cocoonVersion: v0.6.4\n")
    )
    cmdline = project / f"node/run/cloudhypervisor/{build.AGENT_RUN_ID}/cmdline"
    # What a v0.6 start writes: --vsock, and an affinity picked from host load.
    line = cmdline.read_text().replace("queue_affinity=[0@[0],1@[1]]", "queue_affinity=[0@[6],1@[7]]")
    run_dir = f"/var/lib/cocoon/run/cloudhypervisor/{build.AGENT_RUN_ID}"
    cmdline.write_text(line.replace(" --serial ", f" --vsock cid=3,socket={run_dir}/vsock.uds --serial "))
    document: dict[str, Any] = plan_json(project, "--refresh-only")[1]
    assert vm_entry(document, "agent-run")["drift"] == []
    cmdline.write_text(line)  # as v0.3.8 launched it before the node's cocoon was upgraded
    assert vm_entry(plan_json(project, "--refresh-only")[1], "agent-run")["drift"] == []
    cmdline.write_text(line.replace("--memory size=1073741824", "--memory size=2147483648"))
    (drift,) = vm_entry(plan_json(project, "--refresh-only")[1], "agent-run")["drift"]
    assert drift["path"] == ["launch"]


def _fake_cocoon(directory: Path, output: str, code: int = 0) -> Path:
    """A stand-in for the node's cocoon binary that answers `version` as release builds do."""
    binary = directory / "cocoon"
    binary.write_text(f"#!/bin/sh\n[ \"$1\" = version ] || exit 2\nprintf '%s' '{output}'\nexit {code}\n")
    binary.chmod(0o755)
    return binary


VERSION_OUTPUT = (
    "Version: v0.6.4\nGit hash: 0b6770f5\nBuilt: 2026-09-12\nGolang version: go1.24\nOS/Arch: linux/amd64\n"
)


def test_state_export_records_what_cocoon_version_prints(tmp_path: Path) -> None:
    project = _project(tmp_path)
    binary = _fake_cocoon(tmp_path, VERSION_OUTPUT)
    exported = run_cli(["state", "export", "--root", "node", "--cocoon", str(binary)], project)
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["cocoon_version"] == "v0.6.4"
    (project / "state.json").write_text(exported.stdout)
    document = plan_json(project, "--state", "node-a=state.json")[1]
    assert document["nodes"][0]["cocoon"] == {"version": "v0.6.4", "line": "v0.6", "source": "exported"}


@pytest.mark.parametrize(
    ("output", "code", "message"),
    [("Git hash: x\n", 0, "printed no `Version:` line"), (VERSION_OUTPUT, 3, "exited 3")],
)
def test_state_export_refuses_a_cocoon_that_does_not_say(
    tmp_path: Path, output: str, code: int, message: str
) -> None:
    project = _project(tmp_path)
    binary = _fake_cocoon(tmp_path, output, code)
    result = run_cli(["state", "export", "--root", "node", "--cocoon", str(binary)], project)
    assert result.exit_code == 1 and message in result.stderr
    missing = run_cli(["state", "export", "--root", "node", "--cocoon", str(tmp_path / "absent")], project)
    assert missing.exit_code == 1 and "could not run" in missing.stderr


def test_both_example_nodes_are_planned_and_show_the_founding_bug(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples", node_b=True)
    document = plan_json(project)[1]
    assert [(n["name"], n["cocoon"]) for n in document["nodes"]] == [
        ("node-a", {"version": "v0.3.8", "line": "v0.3", "source": "detected"}),
        ("node-b", {"version": "v0.6.x", "line": "v0.6", "source": "detected"}),
    ]
    by_node = {
        node: {vm["name"]: vm for vm in document["vms"] if vm["node"] == node}
        for node in ("node-a", "node-b")
    }
    for node, vms in by_node.items():
        assert {name: vm["action"] for name, vm in vms.items()} == {
            "agent-clone": "replace",
            "agent-run": "no-op",
        }
        assert vms["agent-run"]["drift"] == [], node
    drift = [
        [
            (d["path"], d["expected"], d["found"], d["found_in"])
            for d in by_node[n]["agent-clone"]["drift"]
            if d["kind"] == "layer"
        ]
        for n in by_node
    ]
    assert drift[0] == drift[1] and len(drift[0]) == 9


def test_the_sqlite_examples_exported_state_plans_as_its_root(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples", node_b=True)
    exported = run_cli(["state", "export", "--root", "node-b"], project)
    assert exported.exit_code == 0, exported.stderr
    state = json.loads(exported.stdout)
    assert state["metadata_engine"] == "sqlite" and len(state["vms"]) == 3
    (project / "node-b.json").write_text(exported.stdout)
    against_root = run_cli(["plan", ".", "--json"], project).stdout
    against_export = run_cli(["plan", ".", "--json", "--state", "node-b=node-b.json"], project).stdout
    assert against_export == against_root


def test_a_root_being_converted_is_refused(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples", node_b=True)
    (project / "node-b/meta/meta-convert.manifest").write_text("{}")
    result = run_cli(["plan", "."], project)
    assert result.exit_code == 1
    assert "meta/meta-convert.manifest" in result.stderr and "cocoon meta convert" in result.stderr
    both = copy_examples(tmp_path / "both", node_b=True)
    (both / "node-b/cloudhypervisor/db").mkdir(parents=True, exist_ok=True)  # git keeps no empty dirs
    shutil.copy(both / "node/cloudhypervisor/db/vms.json", both / "node-b/cloudhypervisor/db/vms.json")
    result = run_cli(["plan", "."], both)
    assert result.exit_code == 1 and "both metadata engines hold data" in result.stderr


def test_a_json_root_a_later_cocoon_wrote_needs_its_version(tmp_path: Path) -> None:
    project = _project(tmp_path)
    vms = project / "node/cloudhypervisor/db/vms.json"
    shutil.copy(vms, vms.with_name("vms.json.prev"))  # every later commit rotates one out
    result = run_cli(["plan", "."], project)
    assert result.exit_code == 1
    assert "a cocoon later than v0.3.8 wrote its JSON metadata" in result.stderr
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace("    cpus: 16\n", "    cpus: 16\n    cocoonVersion: v0.6.4\n")
    )
    assert run_cli(["plan", "."], project).exit_code == 0


def test_state_export_asks_the_cocoon_on_path(tmp_path: Path) -> None:
    project = _project(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_cocoon(bin_dir, VERSION_OUTPUT)
    exported = run_cli(
        ["state", "export", "--root", "node"], project, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}
    )
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["cocoon_version"] == "v0.6.4"
    without = run_cli(["state", "export", "--root", "node"], project, env={"PATH": "/nonexistent"})
    assert json.loads(without.stdout)["cocoon_version"] is None


def _version_output(version: str) -> str:
    return VERSION_OUTPUT.replace("v0.6.4", version)


def test_a_v0_3_version_over_a_sqlite_root_is_refused(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples", node_b=True)
    evidence = "its root keeps its metadata in SQLite (meta/meta.db), which no v0.3 release has"
    # What `cocoon version` printed, recorded in an exported state…
    exported = json.loads(run_cli(["state", "export", "--root", "node-b"], project).stdout)
    (project / "node-b.json").write_text(json.dumps(exported | {"cocoon_version": "v0.3.8"}))
    result = run_cli(["plan", ".", "--state", "node-b=node-b.json"], project)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert f"node node-b: its exported state says cocoon v0.3.8, but {evidence}" in result.stderr
    assert "state export --cocoon" in result.stderr
    # …is refused when exported, too: no plan would take such a document.
    binary = _fake_cocoon(tmp_path, _version_output("v0.3.8"))
    refused = run_cli(["state", "export", "--root", "node-b", "--cocoon", str(binary)], project)
    assert refused.exit_code == 1 and refused.stdout == ""
    assert f"version` says v0.3.8, but {evidence}" in refused.stderr
    # The cocoonVersion setting is checked the same way.
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text() + "    cocoonVersion: v0.3.8\n")
    result = run_cli(["plan", "."], project)
    assert result.exit_code == 1
    assert f"node node-b: cocoonVersion says v0.3.8, but {evidence}" in result.stderr
    assert "set cocoonVersion for node-b" in result.stderr
    # A JSON root on the v0.6 line is a legacy root: no contradiction.
    config.write_text(config.read_text().replace("cocoonVersion: v0.3.8", "cocoonVersion: v0.6.4"))
    assert run_cli(["plan", "."], project).exit_code == 0
    legacy = _project(tmp_path / "legacy", "cocoonVersion: v0.6.4")
    assert run_cli(["plan", "."], legacy).exit_code == 0


def test_a_metadata_file_read_from_its_prev_generation_is_a_warning(tmp_path: Path) -> None:
    project = _project(tmp_path, "cocoonVersion: v0.6.4")  # .prev files are a later cocoon's
    vms = project / "node/cloudhypervisor/db/vms.json"
    shutil.copy(vms, vms.with_name("vms.json.prev"))
    vms.write_bytes(vms.read_bytes()[:40])  # a torn write: cocoon reads the .prev generation
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    (warning,) = [w for w in document["warnings"] if ".prev" in w["summary"]]
    assert warning["summary"].startswith("node node-a: cloudhypervisor/db/vms.json cannot be decoded")
    assert "read cloudhypervisor/db/vms.json.prev instead" in warning["summary"]
    # The VMs of the .prev generation: legacy-tool, left alone as cocoonplan did not create it.
    assert any(w["vm"] == "legacy-tool" for w in document["warnings"])
    assert "cloudhypervisor/db/vms.json.prev instead" in run_cli(["plan", "."], project).stdout
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0
    assert "warning: cloudhypervisor/db/vms.json cannot be decoded" in exported.stderr
    state = json.loads(exported.stdout)
    assert [line.split(" (")[0] for line in state["recovered"]] == [
        "cloudhypervisor/db/vms.json cannot be decoded"
    ]
    # A plan from the exported document warns as one from the root does.
    (project / "state.json").write_text(exported.stdout)
    from_export = plan_json(project, "--state", "node-a=state.json")[1]
    assert warning in from_export["warnings"]


@pytest.mark.parametrize(("build", "mode"), [("cocoonstack", "mmap"), ("upstream", "copy")])
def test_the_exported_cloud_hypervisor_build_decides_the_restore_mode(
    tmp_path: Path, build: str, mode: str
) -> None:
    project = _project(tmp_path, vsock=True)
    binary = _fake_cocoon(tmp_path, VERSION_OUTPUT)
    args = ["state", "export", "--root", "node", "--cocoon", str(binary), "--cloud-hypervisor", build]
    exported = run_cli(args, project)
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["cloud_hypervisor"] == build
    (project / "state.json").write_text(exported.stdout)
    code, document = plan_json(project, "--state", "node-a=state.json")
    assert code == 0, document["errors"]
    assert document["nodes"][0]["cloud_hypervisor"] == build
    assert vm_entry(document, "agent-clone")["restore_mode"] == mode
    # The node's setting wins when it agrees, and a contradiction is refused.
    other = "upstream" if build == "cocoonstack" else "cocoonstack"
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace("    cpus: 16\n", f"    cpus: 16\n    cloudHypervisor: {other}\n")
    )
    result = run_cli(["plan", ".", "--state", "node-a=state.json"], project)
    assert result.exit_code == 1
    assert f"node node-a: cloudHypervisor says {other}, and its exported state says {build}" in result.stderr
