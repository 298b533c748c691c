"""CachingStore and BlobCache, over a real registry (stopped to prove what the cache serves)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cocoonplan.errors import DigestMismatchError, RegistryError
from cocoonplan.oci.cache import BlobCache, CachingStore
from cocoonplan.oci.layout import LayoutStore
from cocoonplan.oci.manifest import Descriptor, MediaType
from cocoonplan.oci.registry import RegistryStore
from cocoonplan.oci.store import ContentStore, RawManifest
from registry_server import RegistryServer, blob_digest, push_files


class CountingStore:
    """Passes every call to a real store and counts them by method."""

    def __init__(self, inner: ContentStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def describe(self) -> str:
        return self.inner.describe()

    def get_manifest(self, repository: str, selector: str) -> RawManifest:
        self.calls["get_manifest"] += 1
        return self.inner.get_manifest(repository, selector)

    def get_blob(self, repository: str, descriptor: Descriptor) -> bytes:
        self.calls["get_blob"] += 1
        return self.inner.get_blob(repository, descriptor)

    def download_blob(self, repository: str, descriptor: Descriptor, dest: Path) -> None:
        self.calls["download_blob"] += 1
        self.inner.download_blob(repository, descriptor, dest)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
        yield http


def test_digest_named_content_is_served_from_cache_once_the_registry_is_gone(
    fresh_registry: RegistryServer, client: httpx.Client, tmp_path: Path
) -> None:
    pushed = push_files(fresh_registry, "cache/snap", "v1", {"a.bin": b"cached\n" * 999}, tmp_path / "push")
    inner = CountingStore(RegistryStore(fresh_registry.host, fresh_registry.url, client))
    store = CachingStore(inner, BlobCache(tmp_path / "cache"))
    layer = Descriptor.model_validate(pushed.layer("a.bin"))
    config = Descriptor.model_validate(pushed.manifest["config"])

    first = store.get_manifest("cache/snap", pushed.digest)
    assert store.get_blob("cache/snap", config) == b'{"note":"cocoonplan test"}'
    store.download_blob("cache/snap", layer, tmp_path / "one" / "a.bin")
    assert inner.calls == Counter(get_manifest=1, get_blob=1, download_blob=1)

    fresh_registry.stop()
    assert store.get_manifest("cache/snap", pushed.digest) == first
    assert store.get_blob("cache/snap", config) == b'{"note":"cocoonplan test"}'
    store.download_blob("cache/snap", layer, tmp_path / "two" / "a.bin")
    assert (tmp_path / "two" / "a.bin").read_bytes() == b"cached\n" * 999
    assert inner.calls == Counter(get_manifest=1, get_blob=1, download_blob=1)
    # Written once: the download is the cache entry, and so is what the cache hands out.
    entry = store.cache.path_for(layer.digest)
    assert entry.samefile(tmp_path / "one" / "a.bin") and entry.samefile(tmp_path / "two" / "a.bin")

    # A tag is never answered from the cache, even though its manifest is cached.
    with pytest.raises(RegistryError, match="cannot fetch manifest cache/snap:v1"):
        store.get_manifest("cache/snap", "v1")
    assert inner.calls["get_manifest"] == 2


def test_tags_always_go_to_the_inner_store_and_cache_by_digest(
    fresh_registry: RegistryServer, client: httpx.Client, tmp_path: Path
) -> None:
    inner = CountingStore(RegistryStore(fresh_registry.host, fresh_registry.url, client))
    cache = BlobCache(tmp_path / "cache")
    store = CachingStore(inner, cache)
    before = push_files(fresh_registry, "cache/moving", "v1", {"a.bin": b"before"}, tmp_path / "p1")
    assert store.get_manifest("cache/moving", "v1").digest == before.digest
    after = push_files(fresh_registry, "cache/moving", "v1", {"a.bin": b"after"}, tmp_path / "p2")
    assert after.digest != before.digest
    assert store.get_manifest("cache/moving", "v1").digest == after.digest  # the tag moved
    assert inner.calls["get_manifest"] == 2
    for digest in (before.digest, after.digest):
        assert json.loads(cache.path_for(digest).read_bytes())["layers"]
        assert store.get_manifest("cache/moving", digest).digest == digest
    assert inner.calls["get_manifest"] == 2


def test_corrupted_cache_entries_are_dropped_and_refetched(
    registry: RegistryServer, client: httpx.Client, tmp_path: Path
) -> None:
    content = b"refetch me\n" * 300
    pushed = push_files(registry, "cache/rot", "v1", {"r.bin": content}, tmp_path / "push")
    inner = CountingStore(RegistryStore(registry.host, registry.url, client))
    cache = BlobCache(tmp_path / "cache")
    store = CachingStore(inner, cache)
    layer = Descriptor.model_validate(pushed.layer("r.bin"))

    assert store.get_blob("cache/rot", layer) == content
    cache.path_for(layer.digest).write_bytes(content.replace(b"me", b"ME"))
    assert store.get_blob("cache/rot", layer) == content
    assert inner.calls["get_blob"] == 2
    assert cache.path_for(layer.digest).read_bytes() == content  # repaired

    cache.path_for(layer.digest).write_bytes(b"short")
    store.download_blob("cache/rot", layer, tmp_path / "out" / "r.bin")
    assert (tmp_path / "out" / "r.bin").read_bytes() == content
    assert inner.calls["download_blob"] == 1

    store.get_manifest("cache/rot", pushed.digest)
    cache.path_for(pushed.digest).write_bytes(b"{}")
    assert store.get_manifest("cache/rot", pushed.digest).digest == pushed.digest
    assert inner.calls["get_manifest"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.bin"]


def test_blob_cache_refuses_content_that_does_not_match_its_digest(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(DigestMismatchError):
        cache.put(blob_digest(b"one"), b"two")
    assert cache.get(blob_digest(b"one")) is None
    cache.put(blob_digest(b"one"), b"one")
    assert cache.get(blob_digest(b"one"), 3) == b"one"
    assert cache.get(blob_digest(b"one"), 4) is None  # wrong size: dropped
    assert [p.name for p in (tmp_path / "cache/blobs/sha256").iterdir()] == []


def test_served_media_type_survives_the_cache(tmp_path: Path) -> None:
    # A manifest without its own mediaType: only the layout's index.json entry says what it is.
    config = {"mediaType": "x", "digest": blob_digest(b""), "size": 0}
    manifest = json.dumps({"schemaVersion": 2, "config": config, "layers": []}).encode()
    digest = blob_digest(manifest)
    layout = tmp_path / "layout"
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "blobs/sha256" / digest.removeprefix("sha256:")).write_bytes(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entry = {"mediaType": MediaType.DOCKER_MANIFEST, "digest": digest, "size": len(manifest),
             "annotations": {"org.opencontainers.image.ref.name": "bare/repo:v1"}}  # fmt: skip
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    inner = CountingStore(LayoutStore(layout, "example.com"))
    store = CachingStore(inner, BlobCache(tmp_path / "cache"))
    assert store.get_manifest("bare/repo", "v1").media_type == MediaType.DOCKER_MANIFEST
    assert store.get_manifest("bare/repo", digest).media_type == MediaType.DOCKER_MANIFEST
    assert inner.calls["get_manifest"] == 1
