"""``cocoonplan apply`` end to end: the examples applied to an empty node root whose cocoon is
the v0.3.8 emulator (tests/cocoon_emulator.py), content fetched from the examples' OCI layout,
layers converted with the real mkfs.erofs, then proven by planning again."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, plan_json, run_cli, tree, vm_entry
from cocoon_emulator import install_shim
from metafixture import META_DB, table_name

pytestmark = pytest.mark.usefixtures("erofs_as_root")


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under a node root with its size and modification time (its disks are sparse
    files of gigabytes: never read)."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _empty_node_project(tmp_path: Path) -> Path:
    """A copy of the examples whose node-a is an empty cocoon root run by the emulator."""
    project = copy_examples(tmp_path / "examples")
    root = tmp_path / "node-root"
    root.mkdir()
    shim = install_shim(
        tmp_path / "bin",
        {
            "COCOON_EMULATOR_HOST_ROOT": str(root),
            "COCOON_EMULATOR_SEED": "apply",
            "COCOON_EMULATOR_CPUS": "16",
        },
    )
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace(
            "    state: node\n",
            f"    state: {root}\n    cocoonVersion: v0.3.8\n    cocoon: {shim}\n",
        )
    )
    return project


def test_the_examples_apply_to_an_empty_node_and_prove_themselves(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    planned = run_cli(["plan", ".", "--out", "p.json"], project)
    assert planned.exit_code == 0, planned.stderr
    steps = run_cli(["show", "p.json", "--steps"], project)
    assert steps.exit_code == 0 and "convert-layer" in steps.stdout and "import-snapshot" in steps.stdout
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    assert "node-a/agent-clone: created as " in applied.stdout
    again = run_cli(["plan", ".", "--detailed-exitcode"], project)
    assert again.exit_code == 0, again.stdout
    _, document = plan_json(project)
    clone = vm_entry(document, "agent-clone")
    layers = [d["digest"] for d in clone["disks"] if d["role"] == "layer"]
    assert len(layers) == 11 and clone["action"] == "no-op" and clone["drift"] == []
    root = tmp_path / "node-root"
    assert all((root / "oci/blobs" / f"{d.removeprefix('sha256:')}.erofs").is_file() for d in layers)
    owned = json.loads((root / "cocoonplan/owned.json").read_text())
    assert owned["applied_plan"] == json.loads((project / "p.json").read_text())["digest"]
    assert {entry["name"] for entry in owned["vms"].values()} == {"agent-clone", "agent-run"}
    assert "building" not in owned, "nothing left half recorded"
    assert list((root / "cocoonplan/staging").iterdir()) == [], "staged blobs removed once consumed"
    # Applying the same plan again is refused: the node is no longer what it was planned on.
    stale = run_cli(["apply", "p.json"], project)
    assert stale.exit_code == 1 and "the plan is stale" in stale.stderr


def test_content_only_with_a_corrupted_blob_installs_nothing(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    blobs = sorted((project / "oci/blobs/sha256").iterdir())
    document = json.loads((project / "p.json").read_text())
    layer = next(b for vm in document["vms"] for b in vm["blobs"] if b["kind"] == "layer")
    victim = project / "oci/blobs/sha256" / layer["digest"].removeprefix("sha256:")
    assert victim in blobs
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # Planning read the run image's layers into the digest cache: a verified copy would be used.
    shutil.rmtree(project / ".cocoonplan")
    root = tmp_path / "node-root"
    before = tree(root)
    result = run_cli(["apply", "p.json", "--content-only"], project)
    assert result.exit_code == 1
    assert layer["digest"] in result.stderr
    after = {k: v for k, v in tree(root).items() if not k.startswith("cocoonplan/")}
    assert after == before, "no layer, boot file or image record installed"


def test_a_second_apply_of_the_same_specs_has_nothing_to_do(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    assert run_cli(["apply", ".", "--auto-approve"], project).exit_code == 0
    root = tmp_path / "node-root"
    before = _listing(root)
    again = run_cli(["apply", ".", "--auto-approve"], project)
    assert again.exit_code == 0 and "Nothing to apply." in again.stderr
    assert _listing(root) == before, "nothing fetched, converted or written"


def test_a_plan_made_for_apply_must_be_approved(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    root = tmp_path / "node-root"
    refused = run_cli(["apply", "."], project, input_text="n\n")
    assert refused.exit_code == 1 and "Apply this plan?" in refused.stderr
    assert not (root / "oci").exists(), "nothing done without approval"


@pytest.mark.parametrize(
    ("says", "message"),
    [
        ("v0.6.4", "node node-a runs cocoon v0.6.4, and the plan was made for the v0.3 line"),
        ("v0.5.8", "cocoon v0.5.8 is not supported"),
    ],
)
def test_a_node_whose_cocoon_is_not_what_the_plan_was_made_for_is_refused(
    tmp_path: Path, says: str, message: str
) -> None:
    project = _empty_node_project(tmp_path)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    other = tmp_path / "other-cocoon"
    other.write_text(f"#!/bin/sh\nprintf 'Version: {says}\\nGit hash: x\\n'\n")
    other.chmod(0o755)
    config = project / "cocoonplan.yaml"
    config.write_text("\n".join(
        f"    cocoon: {other}" if line.startswith("    cocoon: ") else line for line in config.read_text().splitlines()
    ) + "\n")  # fmt: skip
    root = tmp_path / "node-root"
    result = run_cli(["apply", "p.json"], project)
    assert result.exit_code == 1 and message in result.stderr
    assert list(root.iterdir()) == [], "nothing changed before the release was checked"


def test_an_imported_snapshot_is_reused_only_with_the_planned_layers(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    assert run_cli(["apply", ".", "--auto-approve"], project).exit_code == 0
    second = (project / "agent-clone.yaml").read_text().replace("name: agent-clone", "name: agent-clone-2")
    (project / "agent-clone-2.yaml").write_text(second)
    root = tmp_path / "node-root"
    snapshots = json.loads((root / "snapshot/db/snapshots.json").read_text())
    (snapshot_id,) = snapshots["snapshots"]
    sidecar = root / f"snapshot/localfile/{snapshot_id}/cocoon.json"
    original = sidecar.read_text()
    meta = json.loads(original)
    meta["storage_configs"] = [c for c in meta["storage_configs"] if c["serial"] != "cocoon-layer10"]
    sidecar.write_text(json.dumps(meta))  # what a hand-made snapshot of the same name could hold
    refused = run_cli(["apply", ".", "--auto-approve"], project)
    assert (
        refused.exit_code == 1 and "whose layers are not the plan's (10 layers, 11 planned)" in refused.stderr
    )
    sidecar.write_text(original)
    reused = run_cli(["apply", ".", "--auto-approve"], project)
    assert reused.exit_code == 0, reused.stderr
    assert json.loads((root / "snapshot/db/snapshots.json").read_text())["snapshots"].keys() == {snapshot_id}


def test_a_snapshot_the_node_holds_under_its_import_name_is_not_fetched_again(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    assert run_cli(["apply", ".", "--auto-approve"], project).exit_code == 0
    second = (project / "agent-clone.yaml").read_text().replace("name: agent-clone", "name: agent-clone-2")
    (project / "agent-clone-2.yaml").write_text(second)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    clone = vm_entry(json.loads((project / "p.json").read_text()), "agent-clone-2")
    files = [b for b in clone["blobs"] if b["kind"] in ("snapshot-file", "snapshot-config")]
    assert files and all(b["present"] for b in files), "the node's import is reused, by its digest"
    steps = run_cli(["show", "p.json", "--steps"], project).stdout
    assert "fetch-blob" not in steps and "import-snapshot" in steps  # the import step re-checks it
    # The snapshot removed between plan and apply: nothing to import from, so plan again.
    root = tmp_path / "node-root"
    (snapshot_id,) = json.loads((root / "snapshot/db/snapshots.json").read_text())["snapshots"]
    assert run_cli(["apply", "p.json"], project).exit_code == 0
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0
    (project / "agent-clone-3.yaml").write_text(second.replace("agent-clone-2", "agent-clone-3"))
    assert run_cli(["plan", ".", "--out", "q.json"], project).exit_code == 0
    shim = tmp_path / "bin" / "cocoon"
    removed = subprocess.run(
        [shim, "snapshot", "rm", snapshot_id], capture_output=True, text=True, check=False
    )
    assert removed.returncode == 0, removed.stderr
    gone = run_cli(["apply", "q.json"], project)
    assert gone.exit_code == 1 and "which is gone now" in gone.stderr, gone.stderr
    assert "plan again" in gone.stderr


def _vms(root: Path) -> dict[str, dict[str, Any]]:
    """The node's VM records by name."""
    db = json.loads((root / "cloudhypervisor/db/vms.json").read_text())
    return {record["config"]["name"]: record for record in db["vms"].values()}


def _owned(root: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((root / "cocoonplan/owned.json").read_text())
    return document


def test_apply_with_target_changes_only_the_named_vms(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    root = tmp_path / "node-root"
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    applied = run_cli(["apply", "p.json", "--target", "agent-run"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    assert "node-a/agent-run: created as " in applied.stdout and "agent-clone" not in applied.stdout
    assert set(_vms(root)) == {"agent-run"}
    snapshots = root / "snapshot/db/snapshots.json"
    assert not snapshots.exists() or not json.loads(snapshots.read_text()).get("snapshots"), (
        "nothing imported"
    )
    assert [entry["name"] for entry in _owned(root)["vms"].values()] == ["agent-run"]

    # A VM the plan replaces is left exactly as it is when another VM is the target.
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace("cpu: 2", "cpu: 4"))
    assert run_cli(["plan", ".", "--out", "p2.json"], project).exit_code == 0
    running = _vms(root)["agent-run"]
    applied = run_cli(["apply", "p2.json", "--target", "agent-clone"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    assert "node-a/agent-clone: created as " in applied.stdout and "agent-run" not in applied.stdout
    assert _vms(root)["agent-run"] == running
    _, document = plan_json(project)
    assert vm_entry(document, "agent-clone")["action"] == "no-op"
    assert vm_entry(document, "agent-run")["action"] == "replace"


def test_the_node_dns_setting_reaches_cocoon(tmp_path: Path) -> None:
    # cocoon writes its --dns servers into each NIC's ip= kernel parameter once CNI leased an
    # address: the proof plans the VM with the node's dns, so cocoon must have been given them.
    project = _empty_node_project(tmp_path)
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace(
            "    cocoonVersion: v0.3.8\n", "    cocoonVersion: v0.3.8\n    dns: [9.9.9.9]\n"
        )
    )
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    vms = json.loads((tmp_path / "node-root/cloudhypervisor/db/vms.json").read_text())["vms"]
    made = next(vm for vm in vms.values() if vm["config"]["name"] == "agent-run")
    assert made["boot_config"]["cmdline"].endswith(":eth0:off:9.9.9.9")
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0


def test_a_stale_plan_names_what_changed_on_the_node(tmp_path: Path) -> None:
    project = _empty_node_project(tmp_path)
    assert run_cli(["apply", ".", "--auto-approve"], project).exit_code == 0
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text() + "  state: stopped\n")
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    assert vm_entry(json.loads((project / "p.json").read_text()), "agent-run")["action"] == "stop"
    # Someone changes the VM behind the plan's back: more CPUs, and stopped by hand.
    db = tmp_path / "node-root/cloudhypervisor/db/vms.json"
    document = json.loads(db.read_text())
    record = next(vm for vm in document["vms"].values() if vm["config"]["name"] == "agent-run")
    record["config"]["cpu"], record["state"] = 3, "stopped"
    db.write_text(json.dumps(document))
    stale = run_cli(["apply", "p.json"], project)
    assert stale.exit_code == 1
    message = " ".join(stale.stderr.split())
    assert "agent-run: the VM changed on the node: state running → stopped, config.cpu 2 → 3" in message
    assert "plan again" in message


def test_content_only_on_a_sqlite_node_installs_content_and_leaves_the_image_record_to_cocoon(
    tmp_path: Path,
) -> None:
    project = copy_examples(tmp_path / "examples", node_b=True)
    root = project / "node-b"
    # node-b without the run image: no record of it in meta.db, none of its layers or boot files.
    with closing(sqlite3.connect(root / META_DB)) as db, db:
        rows = db.execute(f"SELECT id, data FROM {table_name('images_oci', 'records')}").fetchall()
        (key, data) = next((k, d) for k, d in rows if k.endswith("-20260513"))
        db.execute(f"DELETE FROM {table_name('images_oci', 'records')} WHERE id = ?", (key,))
    layers = [layer["digest"].removeprefix("sha256:") for layer in json.loads(data)["layers"]]
    for hex_ in layers:
        (root / f"oci/blobs/{hex_}.erofs").unlink()
    shutil.rmtree(root / "oci/boot")
    spec = (project / "agent-run-b.yaml").read_text().replace("name: agent-run", "name: agent-run-2")
    (project / "agent-run-2.yaml").write_text(spec)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    record = vm_entry(json.loads((project / "p.json").read_text()), "agent-run-2")["image_record"]
    steps = run_cli(["show", "p.json", "--steps"], project).stdout.splitlines()
    assert any(line.split()[1:4] == ["record-image", "node-b", record["manifest_digest"]] for line in steps)
    metadata = tree(root / "meta")

    result = run_cli(["apply", "p.json", "--content-only", "--target", "agent-run-2"], project)
    assert result.exit_code == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert f"run `cocoon image pull {record['key']}` on the node" in said
    assert (
        "Content only: 6 blob(s) fetched, 6 layer(s) converted with their boot files, 0 image record(s)"
        in said
    )
    assert "the nodes run the plan" not in said
    assert all((root / f"oci/blobs/{hex_}.erofs").is_file() for hex_ in layers)
    kernel = record["kernel_layer"].removeprefix("sha256:")
    assert sorted(p.name for p in (root / f"oci/boot/{kernel}").iterdir()) == ["initrd.img", "vmlinuz"]
    assert tree(root / "meta") == metadata, "cocoonplan never writes meta.db"
