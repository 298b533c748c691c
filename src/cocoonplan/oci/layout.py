"""A content store over an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).

Tags are the ``org.opencontainers.image.ref.name`` annotations of ``index.json`` entries. A
layout may hold several repositories, so a tag is matched only with its repository: an entry
named either ``host/repository:tag`` (the full reference, ``host`` being this store's host)
or ``repository:tag`` matches; a bare ``tag`` does not, since it would match in every
repository. (With skopeo: ``skopeo copy ... oci:DIR:repository:tag``.)

A digest selector reads ``blobs/sha256/<hex>`` directly, whatever the repository: a layout
is one content-addressed pool. Every read is verified against its digest, and against the
size recorded in ``index.json`` or the descriptor; ``open_blob`` leaves that to its caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from cocoonplan.bounded import InputLimitError, loads, read_limited
from cocoonplan.errors import NotFoundError, RegistryError
from cocoonplan.oci.manifest import REF_NAME_ANNOTATION, Descriptor, media_type_of
from cocoonplan.oci.store import (
    MAX_MANIFEST_BYTES,
    BlobBody,
    RawManifest,
    is_digest_selector,
    manifest_name,
)
from cocoonplan.oci.verifier import (
    CHUNK_SIZE,
    Verifier,
    read_chunks,
    require_sha256,
    write_verified,
)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
MAX_INDEX_BYTES = 16 << 20
"""Largest ``index.json`` read: a few hundred bytes per tag."""
_LAYOUT_HINT = (
    "create the layout with `skopeo copy docker://<image> oci:<dir>:<repository>:<tag>`, or fix "
    "registries.<host>.layout in cocoonplan.yaml"
)


class LayoutStore:
    """Read the content of registry ``host`` from the OCI image layout at ``path``.

    ``index.json`` is read once, on first use, and kept for the life of the store.
    """

    def __init__(self, path: Path, host: str) -> None:
        self.path = path
        self.host = host
        self._entries: list[dict[str, Any]] | None = None

    def describe(self) -> str:
        """``layout <path> (for <host>)``."""
        return f"layout {self.path} (for {self.host})"

    def get_manifest(self, repository: str, selector: str) -> RawManifest:
        """Find a manifest by ``host/repository:tag``, ``repository:tag`` or digest; verify its bytes."""
        what = f"manifest {manifest_name(repository, selector)}"
        entries = self._index()
        if is_digest_selector(selector):
            require_sha256(selector, what)
            digest, size = selector, None
            listed = next((e for e in entries if e.get("digest") == selector), None)
        else:
            listed = self._find_tag(entries, repository, selector, what)
            digest, size = listed["digest"], listed.get("size")
        content = self._read_blob(digest, size if isinstance(size, int) else None, what, MAX_MANIFEST_BYTES)
        listed_type = listed.get("mediaType") if listed is not None else None
        return RawManifest(
            digest=digest,
            media_type=media_type_of(content, listed_type if isinstance(listed_type, str) else None, what),
            content=content,
        )

    def get_blob(self, repository: str, descriptor: Descriptor) -> bytes:
        """Return a blob's bytes, verified against the descriptor's digest and size."""
        self._index()
        return self._read_blob(
            descriptor.digest, descriptor.size, f"blob {descriptor.digest} of {repository}"
        )

    def download_blob(self, repository: str, descriptor: Descriptor, dest: Path) -> None:
        """Copy a blob to ``dest`` through ``dest`` + ``.part``, verified, then renamed."""
        self._index()
        what = f"blob {descriptor.digest} of {repository}"
        source = self._blob_path(descriptor.digest, what)
        write_verified(
            dest, read_chunks(source), Verifier(descriptor.digest, descriptor.size, what, self.describe())
        )

    @contextlib.contextmanager
    def open_blob(self, repository: str, descriptor: Descriptor, offset: int = 0) -> Iterator[BlobBody]:
        """Stream a blob's bytes from ``offset``, unverified: the caller verifies them."""
        self._index()
        what = f"blob {descriptor.digest} of {repository}"
        source = self._blob_path(descriptor.digest, what)
        try:
            with source.open("rb") as file:
                file.seek(offset)
                yield BlobBody(start=offset, chunks=iter(partial(file.read, CHUNK_SIZE), b""))
        except OSError as exc:
            raise RegistryError(
                f"cannot read {source} in {self.describe()}: {exc}", hint=_LAYOUT_HINT
            ) from exc

    def _index(self) -> list[dict[str, Any]]:
        """Check the layout and load ``index.json`` entries; RegistryError names the path otherwise."""
        if self._entries is not None:
            return self._entries
        if not self.path.is_dir():
            raise RegistryError(f"OCI layout {self.path} for {self.host} does not exist", hint=_LAYOUT_HINT)
        if not (self.path / LAYOUT_FILE).is_file():
            raise RegistryError(
                f"{self.path} is not an OCI image layout: it has no {LAYOUT_FILE} file", hint=_LAYOUT_HINT
            )
        index_path = self.path / INDEX_FILE
        try:
            data = loads(read_limited(index_path, MAX_INDEX_BYTES))
        except FileNotFoundError as exc:
            raise RegistryError(f"OCI layout {self.path} has no {INDEX_FILE}", hint=_LAYOUT_HINT) from exc
        except (OSError, InputLimitError) as exc:
            raise RegistryError(f"cannot read {index_path}: {exc}", hint=_LAYOUT_HINT) from exc
        manifests = data.get("manifests") if isinstance(data, dict) else None
        if not isinstance(manifests, list) or not all(
            isinstance(e, dict) and isinstance(e.get("digest"), str) for e in manifests
        ):
            raise RegistryError(f"{index_path} is not an OCI image index", hint=_LAYOUT_HINT)
        self._entries = manifests
        return manifests

    def _find_tag(
        self, entries: list[dict[str, Any]], repository: str, tag: str, what: str
    ) -> dict[str, Any]:
        wanted = {f"{self.host}/{repository}:{tag}", f"{repository}:{tag}"}
        found = [e for e in entries if _ref_name(e) in wanted]
        if not found:
            names = sorted(filter(None, (_ref_name(e) for e in entries)))
            raise NotFoundError(
                f"{what} not found in {self.describe()}",
                detail="tags in the layout: " + (", ".join(names) or "(none)"),
                hint="the layout's index.json must name it "
                f"{self.host}/{repository}:{tag} or {repository}:{tag} "
                f"in the {REF_NAME_ANNOTATION} annotation",
            )
        if len({e["digest"] for e in found}) > 1:
            raise RegistryError(
                f"{what} is ambiguous in {self.describe()}: both ref.name forms name different manifests",
                detail=", ".join(f"{_ref_name(e)} -> {e['digest']}" for e in found),
                hint="remove one of the entries from the layout's index.json",
            )
        return found[0]

    def _blob_path(self, digest: str, what: str) -> Path:
        path = self.path / "blobs" / "sha256" / require_sha256(digest, what)
        if not path.is_file():
            raise NotFoundError(
                f"{what} not found in {self.describe()}",
                detail=f"missing file blobs/sha256/{path.name}",
                hint="copy the content into the layout again, e.g. with skopeo copy",
            )
        return path

    def _read_blob(self, digest: str, size: int | None, what: str, limit: int | None = None) -> bytes:
        verifier = Verifier(digest, size, what, self.describe())
        chunks: list[bytes] = []
        read = 0
        # Chunked, so a file far larger than the expected size (or the limit, when the size is
        # not known) is rejected without being read whole.
        for chunk in read_chunks(self._blob_path(digest, what)):
            read += len(chunk)
            if limit is not None and read > limit:
                raise RegistryError(
                    f"{what} in {self.describe()} is over the {limit} byte limit of a manifest",
                    hint="the digest names something that is not a manifest; check the reference",
                )
            verifier.update(chunk)
            chunks.append(chunk)
        verifier.finish()
        return b"".join(chunks)


def _ref_name(entry: dict[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    name = annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) else None
