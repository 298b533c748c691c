"""CachingStore and BlobCache, over a real registry (stopped to prove what the cache serves)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cocoonplan.errors import DigestMismatchError, RegistryError
from cocoonplan.oci.cache import BlobCache, CachingStore, Placed
from cocoonplan.oci.layout import LayoutStore
from cocoonplan.oci.manifest import Descriptor, MediaType
from cocoonplan.oci.registry import RegistryStore
from cocoonplan.oci.store import ContentStore, RawManifest
from cocoonplan.oci.verifier import CHUNK_SIZE, Verifier
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


# --------------------------------------------------------------------------- verified hand-offs

LAYER = bytes(range(256)) * (3 * CHUNK_SIZE // 256 + 7)  # a few chunks, not a multiple of one


def counting(hashed: Counter[str]) -> type[Verifier]:
    """A real Verifier that also counts, per digest, the bytes the cache hashes with it."""

    class Counting(Verifier):
        def update(self, chunk: bytes) -> None:
            hashed[self.digest] += len(chunk)
            super().update(chunk)

    return Counting


def _layer() -> Descriptor:
    return Descriptor(
        mediaType="application/vnd.oci.image.layer.v1.tar", digest=blob_digest(LAYER), size=len(LAYER)
    )


def test_a_verified_entry_is_handed_off_without_hashing_it_again(tmp_path: Path) -> None:
    hashed: Counter[str] = Counter()
    cache = BlobCache(tmp_path / "cache", verifier=counting(hashed))
    layer = _layer()
    cache.put(layer.digest, LAYER)
    hashed.clear()
    assert cache.hand_off(layer, tmp_path / "one") is Placed.LINKED
    assert hashed[layer.digest] == len(LAYER), "no record of a verification yet: hashed once"
    assert cache.hand_off(layer, tmp_path / "two") is Placed.LINKED
    assert cache.hand_off(layer, tmp_path / "three") is Placed.LINKED
    assert hashed[layer.digest] == len(LAYER), "linked again without hashing"
    assert (tmp_path / "three").read_bytes() == LAYER

    # A file its caller verified is recorded as it is adopted: its first hand-off hashes nothing.
    other = BlobCache(tmp_path / "other", verifier=counting(hashed))
    downloaded = tmp_path / "downloaded"
    downloaded.write_bytes(LAYER)
    hashed.clear()
    other.adopt(layer, downloaded)
    assert other.hand_off(layer, tmp_path / "four") is Placed.LINKED
    assert hashed[layer.digest] == 0
    assert (tmp_path / "four").samefile(downloaded)


def test_a_verified_entry_is_copied_without_hashing_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    hashed: Counter[str] = Counter()
    cache = BlobCache(tmp_path / "cache", verifier=counting(hashed))
    layer = _layer()
    cache.put(layer.digest, LAYER)
    monkeypatch.setattr(os, "link", cross_device)  # another file system: nothing can be linked
    hashed.clear()
    assert cache.hand_off(layer, tmp_path / "one") is Placed.COPIED
    assert cache.hand_off(layer, tmp_path / "two") is Placed.COPIED
    assert hashed[layer.digest] == len(LAYER), "hashed on the first copy only"
    assert (tmp_path / "two").read_bytes() == LAYER


def _tamper_keeping_size_and_mtime(entry: Path, vouched: os.stat_result) -> None:
    """Change one byte in place and set the mtime back, as a writer hiding an edit would; the
    kernel moves ctime either way (at its clock's granularity: redone until it shows)."""
    with entry.open("r+b") as out:
        out.seek(len(LAYER) // 2)
        out.write(b"\xff" if LAYER[len(LAYER) // 2] != 0xFF else b"\x00")
    for _ in range(2000):
        os.utime(entry, ns=(vouched.st_atime_ns, vouched.st_mtime_ns))
        if entry.stat().st_ctime_ns != vouched.st_ctime_ns:
            return
        time.sleep(0.001)
    raise AssertionError("the file system never moved the entry's ctime")


def test_an_entry_changed_after_its_verification_is_hashed_caught_and_dropped(tmp_path: Path) -> None:
    hashed: Counter[str] = Counter()
    cache = BlobCache(tmp_path / "cache", verifier=counting(hashed))
    layer = _layer()
    cache.put(layer.digest, LAYER)
    assert cache.hand_off(layer, tmp_path / "one") is Placed.LINKED  # hashed, recorded
    entry = cache.path_for(layer.digest)
    vouched = entry.stat()
    _tamper_keeping_size_and_mtime(entry, vouched)
    now = entry.stat()
    assert (now.st_size, now.st_mtime_ns) == (vouched.st_size, vouched.st_mtime_ns), (
        "size and mtime as vouched"
    )
    hashed.clear()
    assert cache.hand_off(layer, tmp_path / "two") is None
    assert hashed[layer.digest] > 0, "hashed, since its ctime moved"
    assert not (tmp_path / "two").exists()
    assert not entry.exists(), "the tampered entry is dropped"
    assert list((tmp_path / "cache/verified/sha256").iterdir()) == [], "and so is its record"


def test_a_planted_verification_record_of_another_file_vouches_for_nothing(tmp_path: Path) -> None:
    # A pull request can commit an entry and a record, but not predict the inode and ctime
    # the checkout gives the entry: a record copied from elsewhere never matches.
    source = BlobCache(tmp_path / "elsewhere")
    layer = _layer()
    source.put(layer.digest, LAYER)
    assert source.hand_off(layer, tmp_path / "one") is Placed.LINKED
    hashed: Counter[str] = Counter()
    planted = tmp_path / "checkout"
    shutil.copytree(tmp_path / "elsewhere", planted)
    bad = bytearray(LAYER)
    bad[7] ^= 1
    BlobCache(planted).path_for(layer.digest).write_bytes(bytes(bad))
    cache = BlobCache(planted, verifier=counting(hashed))
    assert cache.hand_off(layer, tmp_path / "two") is None
    assert hashed[layer.digest] > 0 and not (tmp_path / "two").exists()
