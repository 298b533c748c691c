"""A digest-addressed local cache of manifests and blobs, and a content store that reads through it.

Guarantees:

* entries live at ``<root>/blobs/sha256/<hex>`` and are written with
  :mod:`cocoonplan.atomic` (an exclusive temporary file, fsync, ``os.replace``, never through a
  link), so concurrent writers and crashes never leave a partial entry under its final name;
* an entry is verified every time it is read; one that fails, or is a link or special file
  (the cache may be repository-relative, so a pull request can plant anything there), is
  deleted and fetched again from the inner store, never trusted;
* the one exception is a blob handed off to a file (:meth:`BlobCache.hand_off`): once the
  cache has verified an entry it records, at ``verified/sha256/<hex>``, the entry's stat
  identity (device, inode, size, mtime, ctime), and an entry whose ``fstat`` still shows
  exactly that is placed without being hashed again. A writer can set an edited file's mtime
  back, but not its ctime (only the kernel's clock sets that), and a planted record cannot
  name the inode and ctime a checkout gives the entry; any other entry is hashed as always;
* a cache that cannot be written (a read-only checkout, a full disk) is not an error: it is
  warned about once and planning goes on without caching;
* only content named by a digest is served from the cache. A manifest asked for by tag is
  always asked of the inner store, because tags move, and is then cached under the digest
  it resolved to.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import BinaryIO

from cocoonplan.atomic import NotLinkableError, atomic_writer, link_writer, open_regular, remove_file
from cocoonplan.bounded import InputLimitError, loads
from cocoonplan.errors import CocoonplanError, DigestMismatchError, RegistryError, ResolveError
from cocoonplan.oci.manifest import Descriptor, media_type_of
from cocoonplan.oci.store import (
    MAX_MANIFEST_BYTES,
    BlobBody,
    BlobReader,
    ContentStore,
    RawManifest,
    is_digest_selector,
    manifest_name,
)
from cocoonplan.oci.verifier import CHUNK_SIZE, Verifier, read_chunks, require_sha256, verify_bytes


class Placed(StrEnum):
    """How :meth:`BlobCache.hand_off` placed an entry."""

    LINKED = "linked from the cache"
    COPIED = "copied from the cache"


# Warnings of a run that goes on; with logging not configured, Python prints them to stderr.
_log = logging.getLogger(__name__)

VERIFIED_RECORD_LIMIT = 1024
"""Largest verification record read (one is about 200 bytes)."""


def _identity(status: os.stat_result) -> dict[str, int]:
    """What ties a verification to one state of an entry's file: any write moves its mtime and
    ctime, and only the kernel sets ctime (utime, chmod and links move it too)."""
    return {
        "dev": status.st_dev,
        "ino": status.st_ino,
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "ctime_ns": status.st_ctime_ns,
    }


def _same_bytes(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether nothing but ctime (a link made or removed) moved between two stats of one file."""
    return all(_identity(before)[key] == _identity(after)[key] for key in ("dev", "ino", "size", "mtime_ns"))


def _verified(chunks: Iterable[bytes], verifier: Verifier) -> Iterator[bytes]:
    """Pass ``chunks`` through ``verifier``; a mismatch raises once the last one is through."""
    for chunk in chunks:
        verifier.update(chunk)
        yield chunk
    verifier.finish()


class _HashingReader(io.RawIOBase):
    """Reads ``source`` while feeding every byte to ``verifier``."""

    def __init__(self, source: BinaryIO, verifier: Verifier) -> None:
        self._source = source
        self._verifier = verifier

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._source.read(len(buffer))
        self._verifier.update(chunk)
        buffer[: len(chunk)] = chunk
        return len(chunk)


class BlobCache:
    """Content-addressed files under ``root``; every read is verified, a bad entry is dropped.

    ``verifier`` makes every Verifier the cache hashes with (tests count what it hashes).
    """

    def __init__(self, root: Path, *, verifier: type[Verifier] = Verifier) -> None:
        self.root = root
        self._unwritable = False
        self._verifier = verifier

    def path_for(self, digest: str) -> Path:
        """Where the entry for ``digest`` lives (it may not exist)."""
        return self.root / self._entry(digest)

    @staticmethod
    def _entry(digest: str) -> str:
        return f"blobs/sha256/{require_sha256(digest, 'cache entry')}"

    @staticmethod
    def _media_type_entry(digest: str) -> str:
        return f"media-types/sha256/{require_sha256(digest, 'cache entry')}"

    @staticmethod
    def _verified_entry(digest: str) -> str:
        return f"verified/sha256/{require_sha256(digest, 'cache entry')}"

    def _vouch(self, digest: str, status: os.stat_result) -> None:
        """Record that the entry of ``digest`` was verified in the state ``status`` shows."""
        record = {"digest": digest, **_identity(status)}
        self._write(self._verified_entry(digest), [json.dumps(record, sort_keys=True).encode()])

    def _vouched(self, digest: str, status: os.stat_result) -> bool:
        """Whether the entry of ``digest`` was verified in exactly the state ``status`` shows."""
        content = self._read(self._verified_entry(digest), VERIFIED_RECORD_LIMIT)
        if content is None or len(content) > VERIFIED_RECORD_LIMIT:
            return False
        try:
            record = loads(content)
        except InputLimitError:
            return False
        return bool(record == {"digest": digest, **_identity(status)})

    def _vouch_after(self, digest: str, before: os.stat_result, fd: int, *, recorded: bool = False) -> None:
        """Record the state the entry open as ``fd`` is left in once it was verified (or found
        ``recorded`` as verified) in the state ``before``: placing a hard link moves its ctime,
        and the bytes are still the verified ones while nothing else moved."""
        after = os.fstat(fd)
        if recorded and _identity(after) == _identity(before):
            return  # copied: the record still holds
        if _same_bytes(before, after):
            self._vouch(digest, after)

    def _forget(self, name: str, digest: str) -> None:
        """Drop a bad entry and its verification record."""
        self._drop(name)
        self._drop(self._verified_entry(digest))

    def _open(self, name: str) -> BinaryIO | None:
        try:
            return open_regular(self.root, name)
        except CocoonplanError:
            self._drop(name)  # a link, FIFO or unreadable entry: not one this cache wrote
            return None

    def _read(self, name: str, limit: int | None) -> bytes | None:
        """At most ``limit + 1`` bytes of the entry, so a caller can tell a longer one."""
        source = self._open(name)
        if source is None:
            return None
        with source, contextlib.suppress(OSError):
            return source.read() if limit is None else source.read(limit + 1)
        return None

    def _drop(self, name: str) -> None:
        # A cache that cannot be changed keeps its bad entry; it is never believed anyway.
        with contextlib.suppress(CocoonplanError):
            remove_file(self.root, name)

    def _give_up(self, exc: CocoonplanError) -> None:
        self._unwritable = True
        _log.warning("warning: not caching in %s, going on without: %s", self.root, exc.summary)

    def _write(self, name: str, chunks: Iterable[bytes]) -> None:
        """Store an entry; a DigestMismatchError from ``chunks`` propagates and stores nothing.

        Any other failure turns caching off for the run, with one warning: a plan needs no cache.
        """
        if self._unwritable:
            return
        try:
            with atomic_writer(self.root, name) as out:
                for chunk in chunks:
                    out.write(chunk)
        except DigestMismatchError:
            raise
        except CocoonplanError as exc:
            self._give_up(exc)

    def get(self, digest: str, size: int | None = None, limit: int | None = None) -> bytes | None:
        """Return the verified bytes for ``digest``, or None when absent or corrupt (then deleted).

        With ``limit``, an entry larger than that is not read (None): a manifest looked up by
        a digest that names a multi-GiB layer must not be loaded into memory.
        """
        name = self._entry(digest)
        # Read no further than any answer needs: a limit, else one byte past the expected size.
        content = self._read(name, size if limit is None else limit)
        if content is None or (limit is not None and len(content) > limit):
            return None
        try:
            return verify_bytes(content, self._verifier(digest, size, "cache entry", f"cache {self.root}"))
        except DigestMismatchError:
            self._drop(name)
            return None

    def put(self, digest: str, content: bytes) -> None:
        """Store ``content`` under ``digest``; DigestMismatchError if it does not hash to it."""
        verify_bytes(content, self._verifier(digest, None, "cache entry", "content being cached"))
        self._write(self._entry(digest), [content])

    def adopt(self, descriptor: Descriptor, source: Path) -> None:
        """Store the file ``source``, which its caller has just verified, as the entry: hard-linked,
        neither copied nor hashed again, where the file system allows; else copied, verified
        again as it is copied. Either way the entry is recorded as verified."""
        if self._unwritable:
            return
        try:
            opened = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # not there to cache: the caller's file, its caller's to report
        try:
            with link_writer(opened, self.root, self._entry(descriptor.digest)):
                pass
            self._vouch(descriptor.digest, os.fstat(opened))
            return
        except NotLinkableError:
            pass
        except CocoonplanError as exc:
            self._give_up(exc)
            return
        finally:
            os.close(opened)
        verifier = self._verifier(descriptor.digest, descriptor.size, "cache entry", f"file {source}")
        self._write(self._entry(descriptor.digest), _verified(read_chunks(source), verifier))
        written = self._open(self._entry(descriptor.digest))
        if written is not None:
            with written:
                self._vouch(descriptor.digest, os.fstat(written.fileno()))

    @contextlib.contextmanager
    def reading(self, descriptor: Descriptor) -> Iterator[BinaryIO | None]:
        """The entry as a stream hashed as it is read; None when there is no usable entry.

        When the ``with`` body ends, normally or not, the rest of the entry is read and the
        whole checked: a mismatch drops the entry and raises DigestMismatchError, so nothing
        derived from a bad entry outlives the ``with``.
        """
        name = self._entry(descriptor.digest)
        source = self._open(name)
        if source is None:
            yield None
            return
        verifier = self._verifier(descriptor.digest, descriptor.size, "cache entry", f"cache {self.root}")
        before = os.fstat(source.fileno())
        with source, io.BufferedReader(_HashingReader(source, verifier), CHUNK_SIZE) as stream:
            try:
                yield stream
            except Exception:
                self._settle(name, stream, verifier)  # a bad entry explains any failure best
                raise
            self._settle(name, stream, verifier)
            # Hashed whole: a later hand-off of this entry need not hash it again.
            self._vouch_after(descriptor.digest, before, source.fileno())

    def _settle(self, name: str, stream: BinaryIO, verifier: Verifier) -> None:
        try:
            while stream.read(CHUNK_SIZE):
                pass
            verifier.finish()
        except DigestMismatchError:
            self._forget(name, verifier.digest)
            raise

    def hand_off(self, descriptor: Descriptor, dest: Path) -> Placed | None:
        """Place the entry at ``dest`` (as :mod:`cocoonplan.atomic` places files): hard-linked where
        the file system allows, else copied. An entry the cache verified and that has not
        changed since (its verification record) is placed without hashing; any other is hashed
        on the way, then recorded as verified.

        None when there is no entry, or when it fails verification (it is then deleted and
        ``dest`` is left untouched).
        """
        name = self._entry(descriptor.digest)
        source = self._open(name)
        if source is None:
            return None
        try:
            with source:
                before = os.fstat(source.fileno())
                if before.st_size != descriptor.size:
                    raise DigestMismatchError("a cache entry of another size")  # not worth hashing
                recorded = self._vouched(descriptor.digest, before)
                verifier = None
                if not recorded:
                    verifier = self._verifier(
                        descriptor.digest, descriptor.size, "cache entry", f"cache {self.root}"
                    )
                placed = _place(source, dest, verifier)
                self._vouch_after(descriptor.digest, before, source.fileno(), recorded=recorded)
                return placed
        except DigestMismatchError:
            self._forget(name, descriptor.digest)
            return None

    def remember_media_type(self, digest: str, media_type: str) -> None:
        """Record the Content-Type a manifest without its own ``mediaType`` was served with."""
        self._write(self._media_type_entry(digest), [media_type.encode()])

    def recalled_media_type(self, digest: str) -> str | None:
        """The media type recorded by :meth:`remember_media_type`, if any."""
        content = self._read(self._media_type_entry(digest), 1024)
        with contextlib.suppress(UnicodeDecodeError):
            return (content or b"").decode().strip() or None
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
        """Place a blob at ``dest`` from the cache; when missing, download it there (verified by the
        inner store) and cache that file. Each byte is written and hashed once where the file
        system can hard-link between the two."""
        if self.cache.hand_off(descriptor, dest) is not None:
            return
        self.inner.download_blob(repository, descriptor, dest)
        self.cache.adopt(descriptor, dest)

    def open_blob(
        self, repository: str, descriptor: Descriptor, offset: int = 0
    ) -> contextlib.AbstractContextManager[BlobBody]:
        """Stream a blob from the inner store, past the cache: a caller streaming from an offset
        resumes a download and places the blob itself (the blob executor)."""
        if not isinstance(self.inner, BlobReader):
            raise RegistryError(
                f"{self.inner.describe()} cannot stream blobs from an offset",
                hint="read this registry from a registry endpoint or an OCI layout",
            )
        return self.inner.open_blob(repository, descriptor, offset)

    def _cached_manifest(self, digest: str, content: bytes, name: str) -> RawManifest | None:
        media_type = None if _declares_media_type(content) else self.cache.recalled_media_type(digest)
        try:
            resolved = media_type_of(content, media_type, f"manifest {name}")
        except ResolveError:
            return None  # no usable media type recorded: ask the inner store, which knows it
        return RawManifest(digest=digest, media_type=resolved, content=content)


def _place(source: BinaryIO, dest: Path, verifier: Verifier | None) -> Placed:
    """Link or copy the open entry ``source`` to ``dest``, hashed through ``verifier`` on the way
    unless that is None; a mismatch raises and leaves ``dest`` untouched."""
    chunks = iter(partial(source.read, CHUNK_SIZE), b"")
    try:
        with link_writer(source.fileno(), dest.parent, dest.name):
            if verifier is not None:
                # Hashed through the descriptor the link was made from: exactly the linked bytes.
                for _ in _verified(chunks, verifier):
                    pass
        return Placed.LINKED
    except NotLinkableError:
        source.seek(0)
    with atomic_writer(dest.parent, dest.name) as out:
        for chunk in chunks if verifier is None else _verified(chunks, verifier):
            out.write(chunk)
    return Placed.COPIED


def _declares_media_type(content: bytes) -> bool:
    try:
        media_type_of(content, None, "manifest")
    except ResolveError:
        return False
    return True
