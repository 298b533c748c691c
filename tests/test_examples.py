"""Every shipped example is planned from the committed OCI layout (no server) and pinned.

A change to any layer, disk, config.json field or cmdline of the examples shows up here as
a snapshot diff.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from chschema import config_errors, unknown_keys
from clirunner import EXAMPLES, copy_examples, run_cli
from snapshotext import JSONFile, TextFile

# Keys CH v51 serialises that its OpenAPI document does not list (seen in Example C).
CH_SERIALISED_EXTRAS = {"disable_aio", "disable_io_uring", "fds", "user_devices"}
SPECS = sorted(p.stem for p in EXAMPLES.glob("*.yaml") if p.name != "cocoonplan.yaml")
NODES = {"node-a": "", "node-b": "-b"}
"""Each example node and the suffix of its spec files (agent-clone-b.yaml plans node-b)."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_examples(tmp_path_factory.mktemp("examples") / "examples", node_b=True)


@pytest.fixture(scope="module")
def document(project: Path) -> dict[str, Any]:
    result = run_cli(["plan", ".", "--json"], project)
    assert result.exit_code == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def _vm(document: dict[str, Any], spec: str) -> dict[str, Any]:
    """The VM the spec file ``<spec>.yaml`` plans (``agent-clone-b``: agent-clone on node-b)."""
    node = "node-b" if spec.endswith(NODES["node-b"]) else "node-a"
    name = spec.removesuffix(NODES[node])
    return next(vm for vm in document["vms"] if vm["name"] == name and vm["node"] == node)


def test_every_example_is_planned(document: dict[str, Any]) -> None:
    assert sorted(vm["name"] + NODES[vm["node"]] for vm in document["vms"]) == SPECS
    assert document["errors"] == []
    assert document["lock_changes"] == [], "examples/cocoonplan.lock must be current"


@pytest.mark.parametrize("name", SPECS)
def test_example_plan_is_pinned(document: dict[str, Any], name: str, snapshot: SnapshotAssertion) -> None:
    assert _vm(document, name) == snapshot(extension_class=JSONFile)


@pytest.mark.parametrize("name", SPECS)
def test_example_config_is_pinned_and_valid(
    document: dict[str, Any], name: str, snapshot: SnapshotAssertion
) -> None:
    config = _vm(document, name)["config"]
    assert config_errors(config) == []
    assert {path.rsplit("/", 1)[-1] for path in unknown_keys(config)} <= CH_SERIALISED_EXTRAS
    assert config == snapshot(extension_class=JSONFile)


def test_plan_json_has_the_documented_keys(document: dict[str, Any]) -> None:
    assert document["format_version"] == 2
    assert {"format_version", "vms", "errors", "lock_changes", "summary"} <= set(document)
    for vm in document["vms"]:
        assert {"name", "action", "source", "blobs", "disks", "config", "cmdline"} <= set(vm)
        assert set(vm["source"]) == {"ref", "digest"}
        for blob in vm["blobs"]:
            assert {"digest", "size", "media_type", "source", "present"} <= set(blob)
        for disk in vm["disks"]:
            assert {"index", "serial", "role", "path", "readonly", "digest"} <= set(disk)


def test_clone_example_lists_exactly_the_eleven_base_layers(document: dict[str, Any]) -> None:
    vm = _vm(document, "agent-clone")
    layers = [d for d in vm["disks"] if d["role"] == "layer"]
    assert [d["serial"] for d in layers] == [f"cocoon-layer{i}" for i in range(11)]
    assert [d["index"] for d in vm["disks"]] == list(range(len(vm["disks"])))
    assert [d["role"] for d in vm["disks"][11:]] == ["cow", "data"]
    assert vm["cmdline"].split()[3] == "cocoon.layers=" + ",".join(
        f"cocoon-layer{i}" for i in reversed(range(11))
    )
    assert [d["path"] for d in vm["config"]["disks"]] == [d["path"] for d in vm["disks"]]


def test_human_render_is_pinned(project: Path, snapshot: SnapshotAssertion) -> None:
    result = run_cli(["plan", "."], project)
    assert result.exit_code == 0
    assert result.stdout == snapshot(extension_class=TextFile)


def test_markdown_render_is_pinned(project: Path, snapshot: SnapshotAssertion) -> None:
    result = run_cli(["plan", ".", "--markdown"], project)
    assert result.exit_code == 0
    assert len(result.stdout) <= 60_000
    assert result.stdout == snapshot(extension_class=TextFile)


def test_detailed_exitcode_is_two_for_the_examples(project: Path) -> None:
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 2


def test_saved_plan_shows_the_same(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    planned = run_cli(["plan", ".", "--out", str(out)], project)
    shown = run_cli(["show", str(out)], project)
    assert shown.exit_code == 0
    assert shown.stdout == planned.stdout
    assert run_cli(["show", str(out), "--json"], project).stdout == out.read_text()


def test_show_refuses_another_format_version(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    run_cli(["plan", ".", "--out", str(out)], project)
    document = json.loads(out.read_text())
    document["format_version"] = 99
    out.write_text(json.dumps(document))
    result = run_cli(["show", str(out)], project)
    assert result.exit_code == 1
    assert "plan format_version 99, this cocoonplan reads 2" in result.stderr


def test_render_writes_and_checks_gitops_files(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "rendered"
    assert run_cli(["render", ".", "--dir", str(target)], project).exit_code == 0
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert files == [
        ".cocoonplan-render.json",  # what render wrote, so the only files it may remove later
        *(
            f"{node}/{vm}/{f}"
            for node in NODES
            for vm, names in (
                (
                    "agent-clone",
                    ("config.json", "disks.json", "files.json", "launch", "provisional.json", "restore.json")
                    if node == "node-a"  # only agent-clone.yaml expects files
                    else ("config.json", "disks.json", "launch", "provisional.json", "restore.json"),
                ),
                ("agent-run", ("config.derived.json", "disks.json", "launch", "provisional.json")),
            )
            for f in names
        ),
    ]
    (watchdog,) = json.loads((target / "node-a/agent-clone/files.json").read_text())
    assert (watchdog["path"], watchdog["verdict"], watchdog["layer"]) == (
        "/usr/local/bin/simular-agent-watchdog.sh",
        "holds",
        9,
    )
    # The launch file is quoted for a shell: --cmdline's value is one argument.
    launch = shlex.split((target / "node-a/agent-run/launch").read_text())
    assert launch[launch.index("--cmdline") + 1].startswith("console=hvc0 loglevel=3 boot=cocoon-overlay ")
    restore = json.loads((target / "node-a/agent-clone/restore.json").read_text())
    assert [r["endpoint"] for r in restore] == ["vm.restore", "vm.remove-device", "vm.add-net", "vm.resume"]
    assert run_cli(["render", ".", "--dir", str(target), "--check"], project).exit_code == 0
    config = target / "node-a/agent-clone/config.json"
    config.write_text(config.read_text().replace("cocoon-layer3", "cocoon-layer9"))
    (target / "node-a/ghost/launch").parent.mkdir()
    (target / "node-a/ghost/launch").write_text("x\n")  # not written by render: never stale
    checked = run_cli(["render", ".", "--dir", str(target), "--check"], project)
    assert checked.exit_code == 1
    assert checked.stdout.splitlines() == ["changed: node-a/agent-clone/config.json"]
    assert "cocoon-layer9" in config.read_text(), "--check writes nothing"


@pytest.mark.parametrize("suffix", NODES.values())
def test_examples_show_the_founding_bug_as_drift(document: dict[str, Any], suffix: str) -> None:
    clone = _vm(document, "agent-clone" + suffix)
    assert clone["action"] == "replace"
    assert "disks" in clone["replace_paths"]
    layers = [d for d in clone["drift"] if d["kind"] == "layer"]
    alien = [d for d in layers if d["found"] is not None]
    missing = [d for d in layers if d["found"] is None]
    assert [d["path"] for d in alien] == [["disks", i] for i in range(2, 6)]
    assert all(d["found_in"] == ["ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"] for d in alien)
    assert all(
        "not to the snapshot's base ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface" in d["message"]
        for d in alien
    )
    assert [d["path"] for d in missing] == [["disks", i] for i in range(6, 11)]
    # The spec's expected watchdog script: present in the plan, missing on the node's VM.
    files = [d for d in clone["drift"] if d["kind"] == "file"]
    if suffix == "":
        (watchdog,) = files
        assert watchdog["path"] == ["files", "/usr/local/bin/simular-agent-watchdog.sh"]
        assert watchdog["found_in"] == ["ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface layer 9"]
        assert [(f["path"], f["verdict"], f["layer"]) for f in clone["files"]] == [
            ("/usr/local/bin/simular-agent-watchdog.sh", "holds", 9)
        ]
    assert [d for d in document["drift"] if d["vm"] == clone["name"] and d["node"] == clone["node"]] == [
        {**d, "vm": clone["name"], "node": clone["node"]} for d in clone["drift"]
    ]
    assert all(d["expected"].startswith("sha256:") for d in layers)
    run = _vm(document, "agent-run" + suffix)
    assert run["action"] == "no-op" and run["drift"] == [] and run["changes"] == []
    assert [w["vm"] for w in document["warnings"]] == ["legacy-tool", "legacy-tool"]
    assert document["summary"]["drifted"] == 2


def test_refresh_only_reports_drift_alone(project: Path) -> None:
    result = run_cli(["plan", ".", "--json", "--refresh-only", "--detailed-exitcode"], project)
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["refresh_only"] is True
    # Every VM on the node is reported, with or without a spec, the hand-made one too.
    assert {(vm["node"], vm["name"]): vm["action"] for vm in document["vms"]} == {
        (node, name): "no-op" for node in NODES for name in ("agent-clone", "agent-run", "legacy-tool")
    }
    assert all(vm["changes"] == [] for vm in document["vms"])
    assert len(_vm(document, "agent-clone")["drift"]) == 9
    assert len(_vm(document, "agent-clone-b")["drift"]) == 9
