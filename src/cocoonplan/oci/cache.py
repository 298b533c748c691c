"""A digest-addressed local cache of manifests and blobs, and a content store that reads through it.

Guarantees:

* entries live at ``<root>/blobs/sha256/<hex>`` and are written atomically (a unique
  temporary file, then ``os.replace``), so concurrent writers and crashes never leave a
  partial entry under its final name;
* an entry is verified every time it is read; one that fails is deleted and fetched again
  from the inner store, never trusted;
* only content named by a digest is served from the cache. A manifest asked for by tag is
  always asked of the inner store, because tags move, and is then cached under the digest
  it resolved to.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cocoonplan.errors import DigestMismatchError, ResolveError
from cocoonplan.oci.manifest import Descriptor, media_type_of
from cocoonplan.oci.store import (
    MAX_MANIFEST_BYTES,
    ContentStore,
    RawManifest,
    is_digest_selector,
    manifest_name,
)
from cocoonplan.oci.verifier import (
    Verifier,
    read_chunks,
    require_sha256,
    unique_temp_path,
    verify_bytes,
    write_verified,
)


class BlobCache:
    """Content-addressed files under ``root``; every read is verified, a bad entry is dropped."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, digest: str) -> Path:
        """Where the entry for ``digest`` lives (it may not exist)."""
        return self.root / "blobs" / "sha256" / require_sha256(digest, "cache entry")

    def _media_type_path(self, digest: str) -> Path:
        return self.root / "media-types" / "sha256" / require_sha256(digest, "cache entry")

    def get(self, digest: str, size: int | None = None, limit: int | None = None) -> bytes | None:
        """Return the verified bytes for ``digest``, or None when absent or corrupt (then deleted).

        With ``limit``, an entry larger than that is not read (None): a manifest looked up by
        a digest that names a multi-GiB layer must not be loaded into memory.
        """
        path = self.path_for(digest)
        try:
            if limit is not None and path.stat().st_size > limit:
                return None
            content = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return verify_bytes(content, Verifier(digest, size, "cache entry", f"cache {self.root}"))
        except DigestMismatchError:
            path.unlink(missing_ok=True)
            return None

    def put(self, digest: str, content: bytes) -> None:
        """Store ``content`` under ``digest``; DigestMismatchError if it does not hash to it."""
        dest = self.path_for(digest)
        verifier = Verifier(digest, None, "cache entry", "content being cached")
        write_verified(dest, [content], verifier, temp=unique_temp_path(dest))

    def copy_to(self, descriptor: Descriptor, dest: Path) -> bool:
        """Copy the entry to ``dest`` (atomically, via ``dest`` + ``.part``), verifying it on the way.

        Return False when there is no entry, or when it fails verification (it is then deleted
        and ``dest`` is left untouched).
        """
        source = self.path_for(descriptor.digest)
        if not source.is_file():
            return False
        verifier = Verifier(descriptor.digest, descriptor.size, "cache entry", f"cache {self.root}")
        try:
            write_verified(dest, read_chunks(source), verifier)
        except DigestMismatchError:
            source.unlink(missing_ok=True)
            return False
        except FileNotFoundError:
            return False  # removed by a concurrent cleaner between the check and the read
        return True

    def remember_media_type(self, digest: str, media_type: str) -> None:
        """Record the Content-Type a manifest without its own ``mediaType`` was served with."""
        dest = self._media_type_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = unique_temp_path(dest)
        try:
            temp.write_text(media_type, encoding="utf-8")
            temp.replace(dest)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def recalled_media_type(self, digest: str) -> str | None:
        """The media type recorded by :meth:`remember_media_type`, if any."""
        with contextlib.suppress(FileNotFoundError):
            return self._media_type_path(digest).read_text(encoding="utf-8").strip() or None
        return None


class CachingStore:
    """A :class:`ContentStore` that serves digest-named content from a :class:`BlobCache`.

    Misses are fetched from ``inner`` (which verifies them) and cached. Tag lookups always go
    to ``inner``.
    """

    def __init__(self, inner: ContentStore, cache: BlobCache) -> None:
        self.inner = inner
        self.cache = cache

    def describe(self) -> str:
        """The inner store's description: that is where uncached content comes from."""
        return self.inner.describe()

    def get_manifest(self, repository: str, selector: str) -> RawManifest:
        """Serve a manifest by digest from the cache when present; by tag always from the inner store."""
        if is_digest_selector(selector):
            content = self.cache.get(selector, limit=MAX_MANIFEST_BYTES)
            if content is not None:
                cached = self._cached_manifest(selector, content, manifest_name(repository, selector))
                if cached is not None:
                    return cached
        raw = self.inner.get_manifest(repository, selector)
        self.cache.put(raw.digest, raw.content)
        if not _declares_media_type(raw.content):
            self.cache.remember_media_type(raw.digest, raw.media_type)
        return raw

    def get_blob(self, repository: str, descriptor: Descriptor) -> bytes:
        """Serve a small blob from the cache, else fetch it from the inner store and cache it."""
        content = self.cache.get(descriptor.digest, descriptor.size)
        if content is not None:
            return content
        content = self.inner.get_blob(repository, descriptor)
        self.cache.put(descriptor.digest, content)
        return content

    def download_blob(self, repository: str, descriptor: Descriptor, dest: Path) -> None:
        """Copy a blob to ``dest`` from the cache, downloading it into the cache first when missing."""
        if self.cache.copy_to(descriptor, dest):
            return
        entry = self.cache.path_for(descriptor.digest)
        # A private name, so two processes filling the same entry do not share one .part file.
        staging = unique_temp_path(entry)
        try:
            self.inner.download_blob(repository, descriptor, staging)
            staging.replace(entry)
        finally:
            staging.unlink(missing_ok=True)
        if not self.cache.copy_to(descriptor, dest):
            # Only reachable if the fresh entry was damaged or removed in between; fetch directly.
            self.inner.download_blob(repository, descriptor, dest)

    def _cached_manifest(self, digest: str, content: bytes, name: str) -> RawManifest | None:
        media_type = None if _declares_media_type(content) else self.cache.recalled_media_type(digest)
        try:
            resolved = media_type_of(content, media_type, f"manifest {name}")
        except ResolveError:
            return None  # no usable media type recorded: ask the inner store, which knows it
        return RawManifest(digest=digest, media_type=resolved, content=content)


def _declares_media_type(content: bytes) -> bool:
    try:
        media_type_of(content, None, "manifest")
    except ResolveError:
        return False
    return True
