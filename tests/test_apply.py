"""``cocoonplan apply`` end to end: the examples applied to an empty node root whose cocoon is
the v0.3.8 emulator (tests/cocoon_emulator.py), content fetched from the examples' OCI layout,
layers converted with the real mkfs.erofs, then proven by planning again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clirunner import copy_examples, plan_json, run_cli, tree, vm_entry
from cocoon_emulator import install_shim

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
