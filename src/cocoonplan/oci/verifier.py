"""Digest and size checks for bytes as they stream past, and verified atomic file writes.

Every content store funnels its bytes through a :class:`Verifier`, so "verified" means the
same thing everywhere: the sha256 of exactly the bytes delivered equals the expected digest
and, when a size is expected, so does their count.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from cocoonplan.errors import DigestMismatchError, ResolveError
from cocoonplan.model import DIGEST_PATTERN, short_digest

CHUNK_SIZE = 1 << 20
"""Read and write granularity for streamed blobs: large enough for throughput, small for memory."""

_HEX_LENGTH = 64


def require_sha256(digest: str, what: str) -> str:
    """Return the hex of ``digest``, refusing anything but ``sha256:<64 lower-case hex>``.

    Only sha256 is accepted because every digest cocoonplan records must be comparable with
    every other; a malformed digest must never become part of a file path.
    """
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != _HEX_LENGTH or hex_part.strip("0123456789abcdef"):
        raise ResolveError(
            f"{what}: {digest!r} is not a supported digest",
            hint=f"digests must match {DIGEST_PATTERN}",
        )
    return hex_part


class Verifier:
    """Hash bytes incrementally and compare them with the digest and size that named them.

    ``update`` fails as soon as more bytes than expected arrive, so an oversized or endless
    stream is cut off early instead of being read to the end; ``finish`` checks the rest.
    """

    def __init__(self, digest: str, size: int | None, what: str, source: str) -> None:
        self.digest = digest
        self.size = size
        self.what = what
        self.source = source
        self.count = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        """Account for ``chunk``; raise DigestMismatchError once the expected size is exceeded."""
        self._hash.update(chunk)
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise self._mismatch(f"more than the expected {self.size} bytes")

    def finish(self) -> None:
        """Raise DigestMismatchError unless the bytes seen have the expected size and digest."""
        if self.size is not None and self.count != self.size:
            raise self._mismatch(f"{self.count} bytes, expected {self.size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise self._mismatch(f"bytes hash to {actual}")

    def _mismatch(self, problem: str) -> DigestMismatchError:
        return DigestMismatchError(
            f"{self.what} ({short_digest(self.digest)}) from {self.source} failed verification: {problem}",
            detail=f"expected {self.digest}" + ("" if self.size is None else f", {self.size} bytes"),
            hint="the source serves different bytes than the digest names; "
            "the content was tampered with or corrupted, or the reference records a wrong digest or size",
        )


def verify_bytes(content: bytes, verifier: Verifier) -> bytes:
    """Check ``content`` as a whole and return it; raise DigestMismatchError otherwise."""
    verifier.update(content)
    verifier.finish()
    return content


def part_path(dest: Path) -> Path:
    """The in-progress name of ``dest``: the same path plus ``.part``."""
    return dest.with_name(dest.name + ".part")


def unique_temp_path(dest: Path) -> Path:
    """A temporary sibling of ``dest`` no other writer uses, so concurrent writers never collide."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")


def write_verified(dest: Path, chunks: Iterable[bytes], verifier: Verifier, temp: Path | None = None) -> None:
    """Write ``chunks`` to ``dest`` so that ``dest`` only ever appears complete and verified.

    Bytes go to ``temp`` (default ``dest`` + ``.part``), are flushed to disk, verified, then
    renamed over ``dest`` with ``os.replace`` (atomic on one filesystem). On any failure,
    including an interrupt, the temporary file is removed and ``dest`` is left untouched.
    """
    temp = temp or part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with temp.open("wb") as out:
            for chunk in chunks:
                verifier.update(chunk)
                out.write(chunk)
            verifier.finish()
            out.flush()
            # Durable before it becomes visible: a crash must not leave a short file under the final name.
            os.fsync(out.fileno())
        temp.replace(dest)  # os.replace: atomic on one filesystem
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def read_chunks(path: Path) -> Iterable[bytes]:
    """Yield the bytes of ``path`` in CHUNK_SIZE pieces (the file is closed when exhausted)."""
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            yield chunk
