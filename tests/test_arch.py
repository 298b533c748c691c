"""A node's ``arch`` picks the ``linux/<arch>`` child of a multi-platform index; the lock pins
the index itself, once, for nodes of every architecture."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from clirunner import run_cli
from needs import missing_tool
from ocifixture import (
    GIB,
    OCI_CONFIG,
    OCI_INDEX,
    REF_NAME,
    Artifact,
    Blob,
    SourceVM,
    go_json,
    image,
    layer,
    snapshot,
    write_layout,
)
from registry_server import SKOPEO_BIN, RegistryServer

OS_TAG = "ghcr.io/x/os:multi"
SNAP_TAG = "ghcr.io/x/snap:v1"
PROJECT = """apiVersion: cocoonplan/v1alpha1
kind: Project
registries:
  ghcr.io: {source}
nodes:
  amd: {{cpus: 4}}
  arm: {{cpus: 4, arch: arm64}}
"""
SOURCE_VM = SourceVM(id="ARCHSOURCEVM0000000000000A", name="arch-source", memory=GIB, storage=10 * GIB)


def _image(arch: str) -> Artifact:
    """A bootable image of ``arch`` whose layers hold nothing another architecture's do."""
    built = image(
        [
            layer({"etc/arch": arch.encode()}),
            layer(
                {
                    "boot/vmlinuz-6.1": f"{arch} kernel".encode(),
                    "boot/initrd.img-6.1": f"{arch} initrd".encode(),
                }
            ),
        ]
    )
    # image() writes an amd64 config; give each child the architecture its index entry claims.
    config = Blob(OCI_CONFIG, go_json(json.loads(built.config.data) | {"architecture": arch}))
    manifest = json.loads(built.manifest) | {"config": config.descriptor()}
    return Artifact(go_json(manifest, indent=True), config, built.layers, built.snapshot)


AMD64, ARM64, S390X = _image("amd64"), _image("arm64"), _image("s390x")


def _index(children: Sequence[tuple[Mapping[str, str], Artifact]]) -> Blob:
    """An OCI image index of ``(platform, manifest)`` entries, as a blob of its exact bytes."""
    manifests = [art.descriptor() | {"platform": dict(platform)} for platform, art in children]
    return Blob(
        OCI_INDEX, go_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, indent=True)
    )


# arm64 entries carry variant v8 as buildx writes them; a node asks for linux/arm64, any variant.
OS_INDEX = _index(
    [
        ({"architecture": "amd64", "os": "linux"}, AMD64),
        ({"architecture": "arm64", "os": "linux", "variant": "v8"}, ARM64),
    ]
)
NO_ARM_INDEX = _index(
    [({"architecture": "amd64", "os": "linux"}, AMD64), ({"architecture": "s390x", "os": "linux"}, S390X)]
)
SNAPSHOTS = {
    arch: snapshot(base, base_ref=OS_TAG, vm=SOURCE_VM) for arch, base in (("amd64", AMD64), ("arm64", ARM64))
}
SNAP_INDEX = _index([({"architecture": arch, "os": "linux"}, art) for arch, art in SNAPSHOTS.items()])


def _write_layout(path: Path, tags: Mapping[str, Blob], children: Sequence[Artifact]) -> None:
    """An OCI layout whose tags name indexes; the children are present by digest only, untagged."""
    write_layout(path, {f"child-{art.hex}": art for art in children})
    manifests = []
    for tag, index in sorted(tags.items()):
        (path / "blobs" / "sha256" / index.hex).write_bytes(index.data)
        manifests.append(Blob(OCI_INDEX, index.data, {REF_NAME: tag}).descriptor())
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    (path / "index.json").write_bytes(go_json(document, indent=True) + b"\n")


def _project(root: Path, source: str, specs: Mapping[str, tuple[str, str]]) -> Path:
    """A project reading ghcr.io from ``source``, with one spec per VM name: (node, source line)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cocoonplan.yaml").write_text(PROJECT.format(source=source))
    for name, (node, body) in specs.items():
        (root / f"{name}.yaml").write_text(
            f"apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{{body}, node: {node}}}\n"
        )
    return root


def _layout_project(root: Path, specs: Mapping[str, tuple[str, str]]) -> Path:
    project = _project(root, "{layout: oci}", specs)
    children = [AMD64, ARM64, S390X, *SNAPSHOTS.values()]
    _write_layout(
        project / "oci",
        {OS_TAG: OS_INDEX, "ghcr.io/x/os:no-arm": NO_ARM_INDEX, SNAP_TAG: SNAP_INDEX},
        children,
    )
    return project


def _plan(project: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(["plan", ".", "--json", *extra], project)
    document: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, document


def _vm(document: dict[str, Any], name: str) -> dict[str, Any]:
    vm: dict[str, Any] = next(v for v in document["vms"] if v["name"] == name)
    return vm


def _layer_digests(vm: dict[str, Any]) -> list[str]:
    return [disk["digest"] for disk in vm["disks"] if disk["role"] == "layer"]


def _lock(project: Path) -> dict[str, Any]:
    result = run_cli(["lock", "."], project)
    assert result.exit_code == 0, result.stdout + result.stderr
    lock: dict[str, Any] = json.loads((project / "cocoonplan.lock").read_text())
    return lock


RUN_SPECS = {"vm-amd": ("amd", f"image: {OS_TAG}"), "vm-arm": ("arm", f"image: {OS_TAG}")}


def test_each_node_runs_the_child_of_its_own_arch(tmp_path: Path) -> None:
    code, document = _plan(_layout_project(tmp_path / "repo", RUN_SPECS))
    assert code == 0, document["errors"]
    for name, child in (("vm-amd", AMD64), ("vm-arm", ARM64)):
        vm = _vm(document, name)
        kernel = child.layers[1].hex
        assert vm["source"] == {"ref": OS_TAG, "digest": child.digest}
        assert _layer_digests(vm) == [b.digest for b in child.layers]
        assert vm["config"]["payload"]["kernel"] == f"/var/lib/cocoon/oci/boot/{kernel}/vmlinuz"
    assert not {b.digest for b in AMD64.layers} & {b.digest for b in ARM64.layers}
    # One tag, pinned once, to what it names: the index, not either node's child.
    assert document["lock_changes"] == [{"ref": OS_TAG, "before": None, "after": OS_INDEX.digest}]


def test_lock_pins_the_index_once_and_serves_both_arches(tmp_path: Path) -> None:
    project = _layout_project(tmp_path / "repo", RUN_SPECS)
    lock = _lock(project)
    assert lock["references"] == [
        {"kind": "image", "locked": {"digest": OS_INDEX.digest}, "original": OS_TAG}
    ]
    code, document = _plan(project, "--locked")
    assert code == 0, document["errors"]
    assert document["lock_changes"] == []
    assert [_vm(document, n)["source"]["digest"] for n in ("vm-amd", "vm-arm")] == [
        AMD64.digest,
        ARM64.digest,
    ]


def test_a_node_arch_the_index_lacks_is_an_error(tmp_path: Path) -> None:
    specs = {"vm-amd": ("amd", "image: ghcr.io/x/os:no-arm"), "vm-arm": ("arm", "image: ghcr.io/x/os:no-arm")}
    code, document = _plan(_layout_project(tmp_path / "repo", specs))
    assert code == 1
    (error,) = document["errors"]
    assert error["vm"] == "vm-arm"
    assert error["summary"] == (
        f"index ghcr.io/x/os:no-arm@{NO_ARM_INDEX.digest} has no linux/arm64 manifest; "
        "it offers linux/amd64, linux/s390x"
    )
    assert "push a linux/arm64 build" in error["hint"]
    assert [vm["name"] for vm in document["vms"]] == ["vm-amd"]  # the other node still plans


def test_a_snapshot_index_clones_the_child_of_the_node_arch(tmp_path: Path) -> None:
    body = f"snapshot: {SNAP_TAG}, expect: {{baseImage: {OS_TAG}}}"
    project = _layout_project(tmp_path / "repo", {"clone-amd": ("amd", body), "clone-arm": ("arm", body)})
    lock = _lock(project)
    # Each child records its own platform's base, so the index's entry locks no single base.
    assert lock["references"] == [
        {"kind": "image", "locked": {"digest": OS_INDEX.digest}, "original": OS_TAG},
        {"kind": "snapshot", "locked": {"digest": SNAP_INDEX.digest}, "original": SNAP_TAG},
    ]
    code, document = _plan(project, "--locked")
    assert code == 0, document["errors"]
    for name, arch, base in (("clone-amd", "amd64", AMD64), ("clone-arm", "arm64", ARM64)):
        vm = _vm(document, name)
        # expect.baseImage was compared with the same platform's manifest, or the plan would fail.
        assert vm["source"] == {"ref": SNAP_TAG, "digest": SNAPSHOTS[arch].digest}
        assert vm["base_image"]["digest"] == base.digest
        assert _layer_digests(vm) == [b.digest for b in base.layers]


def test_registry_index_resolves_per_node_and_locks_once(registry: RegistryServer, tmp_path: Path) -> None:
    if SKOPEO_BIN is None:
        missing_tool("skopeo", "skopeo")
    pushed = tmp_path / "push"
    _write_layout(pushed, {"multi": OS_INDEX}, [AMD64, ARM64])
    target = f"docker://{registry.host}/arch/os:multi"
    copy = ["skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false"]
    subprocess.run([*copy, f"oci:{pushed}:multi", target], check=True, capture_output=True)
    project = _project(
        tmp_path / "repo",
        f"{{mirror: {registry.url}}}",
        {
            "vm-amd": ("amd", "image: ghcr.io/arch/os:multi"),
            "vm-arm": ("arm", "image: ghcr.io/arch/os:multi"),
        },
    )
    lock = _lock(project)
    assert [e["locked"]["digest"] for e in lock["references"]] == [OS_INDEX.digest]
    code, document = _plan(project, "--locked")
    assert code == 0, document["errors"]
    assert _layer_digests(_vm(document, "vm-amd")) == [b.digest for b in AMD64.layers]
    assert _layer_digests(_vm(document, "vm-arm")) == [b.digest for b in ARM64.layers]


@pytest.mark.parametrize("arch", ["riscv64", "x86_64", "AMD64"])
def test_only_the_wire_names_of_supported_arches_are_accepted(tmp_path: Path, arch: str) -> None:
    project = _project(tmp_path / "repo", "{layout: oci}", {})
    (project / "cocoonplan.yaml").write_text(PROJECT.format(source="{layout: oci}").replace("arm64", arch))
    result = run_cli(["validate", "."], project)
    assert result.exit_code == 1
    assert "cocoonplan.yaml:7:" in result.stdout + result.stderr
    assert "'amd64' or 'arm64'" in result.stdout + result.stderr
