"""The seam every byte of OCI content comes through.

A :class:`ContentStore` serves one registry host's content, from the registry itself, a
mirror endpoint or an OCI image layout directory. Implementations verify every digest they
are asked for; callers never see unverified bytes, except through :class:`BlobReader`, whose
callers verify while they resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from cocoonplan.model import Digest, Model
from cocoonplan.oci.manifest import Descriptor

MAX_MANIFEST_BYTES = 4 << 20
"""The largest manifest any store reads (distribution's own limit is 4 MiB)."""


class RawManifest(Model):
    """A manifest or index exactly as served, with the digest of those bytes."""

    digest: Digest
    """sha256 of ``content``; when asked for by digest, equal to what was asked."""
    media_type: str
    """The manifest's own ``mediaType``, else the Content-Type it was served with."""
    content: bytes
    """The exact bytes; the digest is computed from these, never from a re-serialisation."""


def is_digest_selector(selector: str) -> bool:
    """Tell a digest selector from a tag: tags cannot contain ``:``, digests always do."""
    return ":" in selector


def manifest_name(repository: str, selector: str) -> str:
    """``repository:tag`` or ``repository@digest``, as a user would write it (for messages)."""
    return f"{repository}@{selector}" if is_digest_selector(selector) else f"{repository}:{selector}"


class ContentStore(Protocol):
    """Read access to the manifests and blobs of one registry host."""

    def describe(self) -> str:
        """Say where bytes come from, for messages (``registry https://ghcr.io``)."""
        ...

    def get_manifest(self, repository: str, selector: str) -> RawManifest:
        """Fetch a manifest or index by tag or digest.

        Raises NotFoundError when it does not exist, DigestMismatchError when asked by
        digest and the bytes hash otherwise, RegistryError when the source cannot be read.
        """
        ...

    def get_blob(self, repository: str, descriptor: Descriptor) -> bytes:
        """Return a small blob's bytes, verified against the descriptor's digest and size."""
        ...

    def download_blob(self, repository: str, descriptor: Descriptor, dest: Path) -> None:
        """Stream a blob to ``dest``, verifying digest and size; ``dest`` appears only when verified."""
        ...


class BlobBody(NamedTuple):
    """A blob's bytes as a source streams them, from ``start`` on; not verified yet."""

    start: int
    """Offset in the blob of the first byte of ``chunks``: the offset asked for, or 0 when the
    source ignored it and sends the whole blob again."""
    chunks: Iterator[bytes]


@runtime_checkable
class BlobReader(Protocol):
    """A store that streams a blob from an offset, for callers that verify, resume and place it themselves."""

    def open_blob(
        self, repository: str, descriptor: Descriptor, offset: int = 0
    ) -> AbstractContextManager[BlobBody]:
        """The blob's raw bytes from ``offset``, while the ``with`` lasts; the caller verifies them."""
        ...
