"""The fixture builder builds what it claims: real layers, manifests, EROFS blobs and node roots,
readable by independent tools (skopeo, erofs-utils, a real registry)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from ocifixture import (
    GIB,
    OCI_LAYER_GZIP,
    SNAPSHOT_ARTIFACT,
    TITLE,
    Artifact,
    Clone,
    DataDisk,
    Nic,
    NodeVM,
    SourceVM,
    boot_files,
    erofs_from_layer,
    files_of,
    image,
    layer,
    node_root,
    push_with_oras,
    push_with_skopeo,
    snapshot,
    write_layout,
)
from registry_server import RegistryServer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
XFACE = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface"
XFACE_0513 = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
AGENT_SNAP = "ghcr.io/cocoonstack/agent-snap:v1"
SOURCE = SourceVM(
    id="UJZDEGXDNCF32EPF3DHODZDOCI",
    name="agent-src",
    nics=[Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1")],
    data_disks=[DataDisk(name="db", size=20 * GIB)],
)


def _small_image() -> Artifact:
    return image(
        [
            layer({"etc/os-release": b"ID=ubuntu\n"}),
            layer({"boot/vmlinuz-6.1": b"kernel", "boot/initrd.img-6.1": b"initrd"}),
            layer({"usr/share/top.txt": b"top\n"}),
        ]
    )


def _json(data: bytes) -> Any:
    return json.loads(data)


def _committed_blob(digest: str) -> bytes:
    return (EXAMPLES / "oci" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def test_layer_is_a_deterministic_gzip_tar() -> None:
    files = {"usr/share/b.txt": b"b", "etc/os-release": b"ID=x\n"}
    blob = layer(files)
    assert blob == layer(dict(reversed(files.items())))
    assert blob.media_type == OCI_LAYER_GZIP
    assert blob.digest == "sha256:" + hashlib.sha256(blob.data).hexdigest()
    assert blob.data[4:8] == b"\0\0\0\0"  # gzip mtime
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.data))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["etc", "etc/os-release", "usr", "usr/share", "usr/share/b.txt"]
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
    assert files_of(blob) == {"etc/os-release": b"ID=x\n", "usr/share/b.txt": b"b"}
    with pytest.raises(ValueError, match="clean relative"):
        layer({"/boot/vmlinuz": b"k"})


def test_boot_scan_follows_cocoon_rules() -> None:
    assert boot_files(layer({"boot/vmlinuz-6.1": b"k", "boot/initrd.img-6.1": b"i"})) == (b"k", b"i")
    assert boot_files(layer({"vmlinuz": b"top-level k"})) == (b"top-level k", None)
    ignored = layer(
        {"boot/vmlinuz-6.1.old": b"old", "usr/boot/vmlinuz": b"deep", "boot/efi/initrd.img": b"x"}
    )
    assert boot_files(ignored) == (None, None)
    art = _small_image()
    kernel, initrd = art.boot_layers()
    assert kernel == initrd == art.layers[1]


def test_image_manifest_and_config() -> None:
    art = _small_image()
    manifest = _json(art.manifest)
    assert art.digest == "sha256:" + hashlib.sha256(art.manifest).hexdigest()
    assert list(manifest) == ["schemaVersion", "mediaType", "config", "layers", "annotations"]
    assert manifest["layers"] == [b.descriptor() for b in art.layers]
    config = _json(art.config.data)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(gzip.decompress(b.data)).hexdigest() for b in art.layers
    ]
    assert art == _small_image()


def test_erofs_conversion_is_valid_and_reproducible(tmp_path: Path) -> None:
    blob = layer({"boot/vmlinuz-6.1": b"kernel" * 100, "etc/os-release": b"ID=ubuntu\n"})
    first = erofs_from_layer(blob, tmp_path / "a.erofs")
    second = erofs_from_layer(blob, tmp_path / "b.erofs")
    assert first.read_bytes() == second.read_bytes()
    subprocess.run(["fsck.erofs", str(first)], check=True, capture_output=True)
    listing = subprocess.run(
        ["dump.erofs", "--ls", "--path=/boot", str(first)], check=True, capture_output=True, text=True
    )
    assert "vmlinuz-6.1" in listing.stdout
    superblock = subprocess.run(["dump.erofs", "-s", str(first)], check=True, capture_output=True, text=True)
    assert str(uuid.uuid5(uuid.NAMESPACE_URL, blob.hex)) in superblock.stdout


def test_snapshot_artifact_shape() -> None:
    base = _small_image()
    art = snapshot(base, base_ref="ghcr.io/x/ubuntu:24.04", vm=SOURCE)
    manifest = _json(art.manifest)
    assert list(manifest) == ["schemaVersion", "mediaType", "artifactType", "config", "layers", "annotations"]
    assert manifest["artifactType"] == SNAPSHOT_ARTIFACT
    assert art.manifest.startswith(b'{\n  "schemaVersion": 2,\n')
    titles = [d["annotations"][TITLE] for d in manifest["layers"]]
    assert titles == ["cocoon.json", "config.json", "cow.raw", "data-db.raw", "memory-ranges", "state.json"]
    assert manifest["annotations"] == {
        "cocoonstack.snapshot.baseimage": "ghcr.io/x/ubuntu:24.04",
        "org.opencontainers.image.created": "2026-05-14T09:12:33Z",
    }
    config = _json(art.config.data)
    assert config["imageDigest"] == base.digest
    assert set(config["imageBlobIds"]) == {b.hex for b in base.layers}
    for name, meta in config["files"].items():
        if "sparseMap" in meta:
            assert sum(seg["l"] for seg in json.loads(meta["sparseMap"])) == len(art.file(name))
    assert config["files"]["cow.raw"]["sparseSize"] == SOURCE.storage
    assert config["files"]["data-db.raw"]["sparseSize"] == 20 * GIB
    assert config["files"]["memory-ranges"]["sparseSize"] == SOURCE.memory


@pytest.mark.parametrize("override", [False, True])
def test_snapshot_cocoon_json_mirrors_config_json(override: bool) -> None:
    base = _small_image()
    other = [layer({"etc/os-release": b"other\n"}).digest, base.layers[1].digest]
    art = snapshot(base, base_ref="b:1", vm=SOURCE, layers_override=other if override else None)
    cocoon = _json(art.file("cocoon.json"))
    ch = _json(art.file("config.json"))
    pairs = list(zip(cocoon["storage_configs"], ch["disks"], strict=True))
    assert [(sc["path"], sc["ro"]) for sc, _ in pairs] == [(d["path"], d["readonly"]) for _, d in pairs]
    layers = [sc["path"] for sc in cocoon["storage_configs"] if sc["role"] == "layer"]
    expected = other if override else [b.digest for b in base.layers]
    assert layers == [f"/var/lib/cocoon/oci/blobs/{d.removeprefix('sha256:')}.erofs" for d in expected]
    assert [d["id"] for d in ch["disks"]] == [f"_disk{i}" for i in range(len(layers) + 2)]
    assert ch["net"][0]["id"] == f"_net{len(layers) + 2}"
    assert ch["net"][0]["tap"] == "tapUJZDEGXD-0"
    assert (
        f"cocoon.layers={','.join(f'cocoon-layer{j}' for j in reversed(range(len(layers))))} "
        in (ch["payload"]["cmdline"])
    )
    assert set(_json(art.config.data)["imageBlobIds"]) == {b.hex for b in base.layers}


def test_snapshot_config_blob_variants() -> None:
    base = _small_image()
    art = snapshot(
        base,
        base_ref="b:1",
        vm=SOURCE,
        blob_ids_as_array=True,
        image_blob_ids_override=[base.layers[0].digest, base.layers[2].hex],
        image_digest_override="sha256:" + "f" * 64,
        base_image_annotation=None,
    )
    config = _json(art.config.data)
    assert config["imageBlobIds"] == sorted([base.layers[0].hex, base.layers[2].hex])
    assert config["imageDigest"] == "sha256:" + "f" * 64
    assert "cocoonstack.snapshot.baseimage" not in _json(art.manifest)["annotations"]


def test_layout_is_readable_by_skopeo(tmp_path: Path) -> None:
    base = _small_image()
    snap = snapshot(base, base_ref="ghcr.io/x/ubuntu:24.04", vm=SOURCE)
    write_layout(tmp_path / "oci", {"ghcr.io/x/ubuntu:24.04": base, "ghcr.io/x/snap:v1": snap})
    for ref, art in (("ghcr.io/x/ubuntu:24.04", base), ("ghcr.io/x/snap:v1", snap)):
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'oci'}:{ref}"], check=True, capture_output=True
        ).stdout
        assert raw == art.manifest


def test_push_preserves_manifest_digests(registry: RegistryServer, tmp_path: Path) -> None:
    base = _small_image()
    snap = snapshot(base, base_ref=f"{registry.host}/ocifixture/base:v1", vm=SOURCE)
    assert push_with_oras(registry.host, "ocifixture/base:v1", base) == base.digest
    assert push_with_oras(registry.host, "ocifixture/snap:v1", snap) == snap.digest
    assert push_with_oras(registry.host, "ocifixture/snap:v1", snap) == snap.digest  # idempotent
    write_layout(tmp_path / "oci", {"snap": snap})
    assert (
        push_with_skopeo(tmp_path / "oci", "snap", f"{registry.host}/ocifixture/snap-skopeo:v1")
        == snap.digest
    )
    for repo in ("ocifixture/snap", "ocifixture/snap-skopeo"):
        response = httpx.get(
            f"http://{registry.host}/v2/{repo}/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert response.content == snap.manifest
        assert response.headers["Docker-Content-Digest"] == snap.digest
    blob = httpx.get(f"http://{registry.host}/v2/ocifixture/snap/blobs/{snap.layers[2].digest}")
    assert blob.content == snap.layers[2].data


def test_node_root_clone_is_patched_like_cocoon(tmp_path: Path) -> None:
    base = _small_image()
    snap = snapshot(base, base_ref="b:1", vm=SOURCE)
    nics = [Nic(ip="10.22.0.9", gateway="10.22.0.1")]
    clone = NodeVM(
        id="V4SEH2KVJ72CEUVW75EFR6EDT4", name="c", source=Clone(snap), cpu=4, memory=2 * GIB, nics=nics
    )
    node_root(tmp_path, images={"b:1": base}, vms=[clone], extra_files={"cocoonplan/owner.json": b"{}"})
    run = tmp_path / "run" / "cloudhypervisor" / clone.id
    assert (run / "cocoon.json").read_bytes() == snap.file("cocoon.json")
    ch = _json((run / "config.json").read_bytes())
    assert list(ch) == sorted(ch)
    assert [d["path"] for d in ch["disks"]][-2:] == [f"/var/lib/cocoon/run/cloudhypervisor/{clone.id}/cow.raw",
                                                      f"/var/lib/cocoon/run/cloudhypervisor/{clone.id}/data-db.raw"]  # fmt: skip
    assert (ch["serial"], ch["console"]) == ({"mode": "Off"}, {"mode": "Pty"})
    assert (ch["cpus"]["boot_vcpus"], ch["memory"]["size"], ch["balloon"]["size"]) == (4, 2 * GIB, GIB // 2)
    assert ch["payload"] == _json(snap.file("config.json"))["payload"]
    state = (run / "state.json").read_text()
    assert f"{clone.id}/cow.raw" in state and SOURCE.id not in state
    assert (
        run / "cmdline"
    ).read_text() == f"cloud-hypervisor --api-socket /var/lib/cocoon/run/cloudhypervisor/{clone.id}/api.sock"
    record = _json((tmp_path / "cloudhypervisor/db/vms.json").read_bytes())["vms"][clone.id]
    assert [sc["path"] for sc in record["storage_configs"]] == [d["path"] for d in ch["disks"]]
    assert record["boot_config"]["cmdline"].endswith(
        "cocoon.hostname=c ip=10.22.0.9::10.22.0.1:255.255.0.0:c:eth0:off:8.8.8.8:1.1.1.1"
    )
    with pytest.raises(ValueError, match="must be >= the snapshot's"):
        node_root(
            tmp_path / "x", images={"b:1": base}, vms=[NodeVM(id=clone.id, name="c", source=Clone(snap))]
        )
    assert (tmp_path / "cocoonplan/owner.json").read_bytes() == b"{}"
    images = _json((tmp_path / "oci/db/images.json").read_bytes())["images"]
    erofs = sum((tmp_path / f"oci/blobs/{b.hex}.erofs").stat().st_size for b in base.layers)
    assert images["b:1"]["size"] == erofs + len(b"kernel") + len(b"initrd")


def test_examples_freeze_the_founding_bug() -> None:
    index = _json((EXAMPLES / "oci" / "index.json").read_bytes())
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert sorted(refs) == [AGENT_SNAP, XFACE, XFACE_0513]
    for ref, digest in refs.items():
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{EXAMPLES / 'oci'}:{ref}"], check=True, capture_output=True
        ).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    xface = [d["digest"] for d in _json(_committed_blob(refs[XFACE]))["layers"]]
    xface_0513 = [d["digest"] for d in _json(_committed_blob(refs[XFACE_0513]))["layers"]]
    assert (len(xface), len(xface_0513), xface[:2] == xface_0513[:2]) == (11, 6, True)
    assert not set(xface[2:]) & set(xface_0513[2:])
    snap_layers = {
        d["annotations"][TITLE]: d["digest"] for d in _json(_committed_blob(refs[AGENT_SNAP]))["layers"]
    }
    snap_cocoon = _json(_committed_blob(snap_layers["cocoon.json"]))
    assert [sc["serial"] for sc in snap_cocoon["storage_configs"]].count("cocoon-cow") == 1
    assert len([sc for sc in snap_cocoon["storage_configs"] if sc["role"] == "layer"]) == 11

    node = EXAMPLES / "node"
    vms = _json((node / "cloudhypervisor/db/vms.json").read_bytes())
    clone = vms["vms"][vms["names"]["agent-clone"]]
    expected = [f"/var/lib/cocoon/oci/blobs/{d.removeprefix('sha256:')}.erofs" for d in xface_0513]
    run = node / "run/cloudhypervisor" / clone["id"]
    on_disk = {
        "vms.json": [sc["path"] for sc in clone["storage_configs"] if sc["role"] == "layer"],
        "config.json": [
            d["path"] for d in _json((run / "config.json").read_bytes())["disks"] if d["readonly"]
        ],
        "cocoon.json": [
            sc["path"]
            for sc in _json((run / "cocoon.json").read_bytes())["storage_configs"]
            if sc["role"] == "layer"
        ],
    }
    assert on_disk == dict.fromkeys(on_disk, expected)
    assert clone["config"]["image_digest"] == refs[XFACE]
    for path in expected:
        assert (node / path.removeprefix("/var/lib/cocoon/")).is_file()
    healthy = vms["vms"][vms["names"]["agent-run"]]
    healthy_run = node / "run/cloudhypervisor" / healthy["id"]
    assert not (healthy_run / "config.json").exists()
    cmdline = (healthy_run / "cmdline").read_text()
    assert cmdline.startswith(
        f"cloud-hypervisor --api-socket {healthy['run_dir']}/api.sock --cpus boot=2,max=16 "
    )
    assert all(sc["path"] in cmdline for sc in healthy["storage_configs"])
    images = _json((node / "oci/db/images.json").read_bytes())["images"]
    assert sorted(images) == [XFACE, XFACE_0513]


def test_committed_examples_match_a_fresh_build() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "build.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
