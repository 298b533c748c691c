"""LayoutStore over OCI image layouts written by skopeo from content oras-py pushed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cocoonplan.errors import DigestMismatchError, NotFoundError, RegistryError
from cocoonplan.oci.layout import LayoutStore
from cocoonplan.oci.manifest import Descriptor, MediaType
from registry_server import Pushed, RegistryServer, push_files, skopeo_to_layout

HOST = "ghcr.io"


@pytest.fixture(scope="module")
def artifacts(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pushed]:
    work = tmp_path_factory.mktemp("layout-push")
    return {
        "snap": push_files(registry, "layout/snap", "v1", {"a.bin": b"alpha\n" * 50}, work / "snap"),
        "other": push_files(registry, "layout/other", "v2", {"b.bin": b"beta\n" * 70}, work / "other"),
        "elsewhere": push_files(registry, "layout/snap", "v3", {"c.bin": b"gamma\n"}, work / "elsewhere"),
    }


@pytest.fixture(scope="module")
def layout(
    registry: RegistryServer, artifacts: dict[str, Pushed], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("layouts") / "layout"
    # The two ref.name forms LayoutStore accepts, and a full name for another host.
    skopeo_to_layout(registry, "layout/snap", "v1", path, "layout/snap:v1")
    skopeo_to_layout(registry, "layout/other", "v2", path, f"{HOST}/layout/other:v2")
    skopeo_to_layout(registry, "layout/snap", "v3", path, "quay.io/layout/snap:v3")
    return path


def desc(item: dict[str, object]) -> Descriptor:
    return Descriptor.model_validate(item)


def test_tags_match_both_ref_name_forms(layout: Path, artifacts: dict[str, Pushed]) -> None:
    store = LayoutStore(layout, HOST)
    snap = store.get_manifest("layout/snap", "v1")
    assert snap.digest == artifacts["snap"].digest  # skopeo kept the digest oras-py pushed
    assert json.loads(snap.content) == artifacts["snap"].manifest
    assert snap.media_type == MediaType.OCI_MANIFEST
    assert store.get_manifest("layout/other", "v2").digest == artifacts["other"].digest


def test_tag_of_another_host_or_repository_is_not_found(layout: Path) -> None:
    store = LayoutStore(layout, HOST)
    with pytest.raises(
        NotFoundError, match=f"manifest layout/snap:v3 not found in layout {layout}"
    ) as raised:
        store.get_manifest("layout/snap", "v3")
    assert raised.value.detail == (
        "tags in the layout: ghcr.io/layout/other:v2, layout/snap:v1, quay.io/layout/snap:v3"
    )
    with pytest.raises(NotFoundError):
        store.get_manifest("layout/other", "v1")
    assert LayoutStore(layout, "quay.io").get_manifest("layout/snap", "v3").content


def test_digest_reads_the_blob_directly(layout: Path, artifacts: dict[str, Pushed]) -> None:
    store = LayoutStore(layout, HOST)
    digest = artifacts["elsewhere"].digest
    # Any repository: a layout is one content-addressed pool.
    assert store.get_manifest("some/repo", digest).digest == digest
    with pytest.raises(NotFoundError, match=r"manifest layout/snap@sha256:0{64} not found"):
        store.get_manifest("layout/snap", "sha256:" + "0" * 64)


def test_blobs_are_read_and_copied(layout: Path, artifacts: dict[str, Pushed], tmp_path: Path) -> None:
    store = LayoutStore(layout, HOST)
    layer = desc(artifacts["snap"].layer("a.bin"))
    assert store.get_blob("layout/snap", layer) == b"alpha\n" * 50
    store.download_blob("layout/snap", layer, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"alpha\n" * 50
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_corrupted_layout_is_detected(layout: Path, artifacts: dict[str, Pushed], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(layout, broken)
    layer = desc(artifacts["snap"].layer("a.bin"))
    blob = broken / "blobs/sha256" / layer.digest.removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes().replace(b"alpha", b"ALPHA"))
    store = LayoutStore(broken, HOST)
    with pytest.raises(DigestMismatchError, match="bytes hash to"):
        store.get_blob("layout/snap", layer)
    out = tmp_path / "out"
    with pytest.raises(DigestMismatchError):
        store.download_blob("layout/snap", layer, out / "a.bin")
    assert list(out.iterdir()) == []

    manifest = broken / "blobs/sha256" / artifacts["other"].digest.removeprefix("sha256:")
    manifest.write_bytes(manifest.read_bytes() + b"\n")
    with pytest.raises(DigestMismatchError, match="manifest layout/other:v2"):
        store.get_manifest("layout/other", "v2")

    blob.unlink()
    with pytest.raises(NotFoundError, match=f"blob {layer.digest} of layout/snap not found in layout"):
        store.get_blob("layout/snap", layer)


def test_missing_or_incomplete_layout_is_a_registry_error(layout: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(RegistryError, match=f"OCI layout {missing} for {HOST} does not exist") as raised:
        LayoutStore(missing, HOST).get_manifest("layout/snap", "v1")
    assert "skopeo copy" in raised.value.hint
    assert "registries.<host>.layout" in raised.value.hint

    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(RegistryError, match="has no oci-layout file"):
        LayoutStore(partial, HOST).get_manifest("layout/snap", "v1")
    shutil.copy(layout / "oci-layout", partial / "oci-layout")
    with pytest.raises(RegistryError, match=r"has no index\.json"):
        LayoutStore(partial, HOST).get_blob(
            "layout/snap", Descriptor(media_type="x", digest="sha256:" + "1" * 64, size=1)
        )
    (partial / "index.json").write_text("{")
    with pytest.raises(RegistryError, match=r"cannot read .*index\.json"):
        LayoutStore(partial, HOST).get_manifest("layout/snap", "v1")
