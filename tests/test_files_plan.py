"""``expect.files`` and ``expect.absent`` through the real CLI, over a copy of the shipped examples
(OCI layout, node root with its EROFS layers): the founding bug's watchdog script is found on
the planned 11 layers and missing from the 6 the node's clone runs on; a path no planned layer
holds fails the plan naming it; a layer that cannot be read makes a check unknown, never failed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, example_builder, plan_json, run_cli, vm_entry
from cocoonplan.resolvers import layerscan

BUILD = example_builder()
ARTIFACTS, _ = BUILD.scenario()
XFACE = ARTIFACTS[BUILD.XFACE]
WATCHDOG = "/" + BUILD.WATCHDOG
WATCHDOG_LAYER = XFACE.layers[BUILD.WATCHDOG_LAYER]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "examples")


def _expect(project: Path, spec: str, *lines: str) -> None:
    """Append ``lines`` to the ``expect:`` block of a spec (adding the block when it has none)."""
    path = project / spec
    text = path.read_text()
    if "  expect:\n" not in text:
        text += "  expect:\n"
    path.write_text(text + "".join(f"    {line}\n" for line in lines))


def _forget_blob(project: Path, digest: str) -> None:
    """The layer's blob is in neither the OCI layout nor the cache of the copy."""
    for store in ("oci/blobs/sha256", ".cocoonplan/cache/blobs/sha256"):
        (project / store / digest.removeprefix("sha256:")).unlink(missing_ok=True)


def test_the_planned_clone_holds_the_watchdog_and_the_node_clone_lacks_it(project: Path) -> None:
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    clone = vm_entry(document, "agent-clone")
    (planned,) = clone["files"]
    assert planned | {"message": None} == {
        "path": WATCHDOG,
        "expect": "present",
        "sha256": None,
        "mode": "0755",
        "verdict": "holds",
        "found": True,
        "kind": "file",
        "resolved": None,
        "layer": BUILD.WATCHDOG_LAYER,
        "layer_digest": WATCHDOG_LAYER.digest,
        "found_mode": "0755",
        "found_sha256": None,
        "provided_by": [],
        "message": None,
    }
    (missing,) = [d["file"] for d in clone["drift"] if d["kind"] == "file"]
    assert (missing["path"], missing["verdict"], missing["found"]) == (WATCHDOG, "fails", False)
    # It should have come from layer 9 of the snapshot's base image.
    assert missing["provided_by"][0] == {
        "image": BUILD.XFACE,
        "digest": XFACE.digest,
        "layer": BUILD.WATCHDOG_LAYER,
        "layer_digest": WATCHDOG_LAYER.digest,
    }
    assert missing["message"].startswith("missing from the 6 layers it runs on; layer 9 (")
    assert document["summary"]["drifted"] == 1
    # A VM whose spec expects no files carries no proof: its entry is as it always was.
    assert "files" not in vm_entry(document, "agent-run")
    assert not any(d["kind"] == "file" for d in vm_entry(document, "agent-run")["drift"])


def test_a_path_no_planned_layer_holds_fails_the_plan_naming_it(project: Path) -> None:
    _expect(project, "agent-clone.yaml", "  - /usr/local/bin/not-built.sh")
    result = run_cli(["plan", ".", "--json"], project)
    assert result.exit_code == 1
    (error,) = json.loads(result.stdout)["errors"]
    assert error["vm"] == "agent-clone"
    assert error["summary"] == (
        "VM agent-clone: expected file /usr/local/bin/not-built.sh: missing from its 11 planned layers"
    )
    human = run_cli(["plan", "."], project)
    assert human.exit_code == 1 and "/usr/local/bin/not-built.sh" in human.stdout + human.stderr


def test_a_missing_file_names_the_layer_and_image_that_provide_it(project: Path) -> None:
    # agent-run boots the 6-layer image, which never had the watchdog.
    _expect(project, "agent-run.yaml", f"files: [{WATCHDOG}]")
    code, document = plan_json(project)
    assert code == 1
    (error,) = document["errors"]
    assert error["summary"] == (
        f"VM agent-run: expected file {WATCHDOG}: missing from its 6 planned layers; "
        f"layer 9 ({WATCHDOG_LAYER.hex[:12]}) of {BUILD.XFACE} provides it"
    )
    assert "agent-clone" in {vm["name"] for vm in document["vms"]}  # the other VMs are still planned


def test_content_mode_and_absence_are_checked(project: Path) -> None:
    _expect(
        project,
        "agent-clone.yaml",
        f"  - {{path: /opt/agent/VERSION, sha256: {hashlib.sha256(b'another build').hexdigest()}}}",
        "  - {path: /etc/os-release, mode: '0600'}",
        "absent: [/etc/hostname]",
    )
    code, document = plan_json(project)
    assert code == 1
    (error,) = document["errors"]
    version = next(f for layer, f in BUILD.UPPER_FILES.items() if layer == 10)
    found = hashlib.sha256(f"# {version} from xface 24.04 layer 10\n".encode()).hexdigest()
    bottom = XFACE.layers[0].hex[:12]
    assert error["summary"] == (
        f"VM agent-clone: expected file /opt/agent/VERSION: in layer 10 ({XFACE.layers[10].hex[:12]}): "
        f"its content's sha256 is {found[:12]}…, not {hashlib.sha256(b'another build').hexdigest()[:12]}… "
        "(and 2 more)"
    )
    assert error["detail"].splitlines()[1:] == [
        f"  /etc/os-release: in layer 0 ({bottom}): its mode is 0644, not 0600",
        f"  /etc/hostname: in layer 0 ({bottom}): a file is there",
    ]


def test_the_right_content_holds(project: Path) -> None:
    digest = hashlib.sha256(BUILD.WATCHDOG_SCRIPT).hexdigest()
    _expect(project, "agent-clone.yaml", f"  - {{path: {WATCHDOG}, sha256: {digest}}}")
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    checks = vm_entry(document, "agent-clone")["files"]
    assert [(c["verdict"], c["found_sha256"]) for c in checks] == [("holds", None), ("holds", digest)]


def test_the_nodes_erofs_layer_is_read_when_no_blob_is_offline(project: Path) -> None:
    for blob in XFACE.layers[2:]:
        _forget_blob(project, blob.digest)
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    (planned,) = vm_entry(document, "agent-clone")["files"]
    assert (planned["verdict"], planned["layer"], planned["found_mode"]) == ("holds", 9, "0755")


def test_a_layer_that_cannot_be_read_is_unknown_never_failed(project: Path) -> None:
    _forget_blob(project, WATCHDOG_LAYER.digest)
    (project / "node/oci/blobs" / f"{WATCHDOG_LAYER.hex}.erofs").write_bytes(b"not an EROFS image")
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    clone = vm_entry(document, "agent-clone")
    (planned,) = clone["files"]
    assert (planned["verdict"], planned["found"]) == ("unknown", None)
    assert planned["message"] == (
        f"not known: layer 9 ({WATCHDOG_LAYER.hex[:12]}) could not be read: its blob: blob {WATCHDOG_LAYER.digest} "
        f"of cocoonstack/cocoon/ubuntu not found in layout {project / 'oci'} (for ghcr.io); EROFS layer "
        f"oci/blobs/{WATCHDOG_LAYER.hex}.erofs of node node-a is cut short: 128 bytes at offset 1024 lie "
        "past its end (18 bytes)"
    )
    # The node's clone still lacks it for sure; where it should come from is not known.
    (missing,) = [d["file"] for d in clone["drift"] if d["kind"] == "file"]
    assert (missing["verdict"], missing["provided_by"]) == ("fails", [])
    # Nothing else changed: the same actions, no deletes.
    assert sorted((vm["name"], vm["action"]) for vm in document["vms"]) == [
        ("agent-clone", "replace"),
        ("agent-run", "no-op"),
    ]


def test_each_layer_is_read_once_whatever_the_number_of_specs(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clone = (project / "agent-clone.yaml").read_text()
    for name in ("agent-two", "agent-three"):
        (project / f"{name}.yaml").write_text(clone.replace("name: agent-clone", f"name: {name}"))
    _expect(project, "agent-run.yaml", "absent: [/usr/local/bin/simular-agent-watchdog.sh]")
    read: Counter[str] = Counter()
    real = layerscan.scan_layer

    def counted(stream: Any, what: str, **options: Any) -> layerscan.LayerScan:
        read[what.split()[1]] += 1
        return real(stream, what, **options)

    monkeypatch.setattr(layerscan, "scan_layer", counted)
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    assert sum(len(vm.get("files", ())) for vm in document["vms"]) == 4
    assert read and max(read.values()) == 1, read
    # Both images' layers were needed (the run's boot scan, the clones' checks) and read once.
    assert set(read) == {b.digest for b in XFACE.layers} | {
        b.digest for b in ARTIFACTS[BUILD.XFACE_0513].layers
    }


def test_a_node_known_from_a_state_document_is_checked_from_the_layer_blobs(project: Path) -> None:
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0, exported.stderr
    (project / "node-a.json").write_text(exported.stdout)
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("    state: node\n", "    state: node-a.json\n"))
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    (missing,) = [d["file"] for d in vm_entry(document, "agent-clone")["drift"] if d["kind"] == "file"]
    assert (missing["verdict"], missing["provided_by"][0]["layer"]) == ("fails", 9)

    _forget_blob(project, WATCHDOG_LAYER.digest)
    code, document = plan_json(project)
    (planned,) = vm_entry(document, "agent-clone")["files"]
    assert planned["verdict"] == "unknown"
    assert planned["message"].endswith(
        "; no node root is readable from here (a state document holds no layers)"
    )
