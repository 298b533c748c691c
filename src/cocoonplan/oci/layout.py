"""A content store over an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).

Tags are the ``org.opencontainers.image.ref.name`` annotations of ``index.json`` entries. A
layout may hold several repositories, so a tag is matched only with its repository: an entry
named either ``host/repository:tag`` (the full reference, ``host`` being this store's host)
or ``repository:tag`` matches; a bare ``tag`` does not, since it would match in every
repository. (With skopeo: ``skopeo copy ... oci:DIR:repository:tag``.)

A digest selector reads ``blobs/sha256/<hex>`` directly, whatever the repository: a layout
is one content-addressed pool. Every read is verified against its digest, and against the
size recorded in ``index.json`` or the descriptor; ``open_blob`` leaves that to its caller.

A layout usually sits in the repository, where a pull request can commit a link or a FIFO
under any name. So every file of it is read as :func:`cocoonplan.atomic.open_regular` reads:
no link below the layout directory is followed, only regular files are opened (a FIFO is
never waited on), what is read into memory is bounded, and a file that cannot be read is a
:class:`RegistryError` naming the blob and the layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from cocoonplan.atomic import ReadError, open_regular, read_bounded
from cocoonplan.bounded import InputLimitError, loads
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
    require_sha256,
    write_verified,
)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
MAX_INDEX_BYTES = 16 << 20
"""Largest ``index.json`` read: a few hundred bytes per tag."""
MAX_LAYOUT_FILE_BYTES = 4096
"""Largest ``oci-layout`` read: ``{"imageLayoutVersion": "1.0.0"}``."""
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
        with self._open_blob(descriptor.digest, what) as file:
            write_verified(
                dest,
                self._chunks(file, descriptor.digest, what),
                Verifier(descriptor.digest, descriptor.size, what, self.describe()),
            )

    @contextlib.contextmanager
    def open_blob(self, repository: str, descriptor: Descriptor, offset: int = 0) -> Iterator[BlobBody]:
        """Stream a blob's bytes from ``offset``, unverified: the caller verifies them."""
        self._index()
        what = f"blob {descriptor.digest} of {repository}"
        with self._open_blob(descriptor.digest, what) as file:
            try:
                file.seek(offset)
            except OSError as exc:
                raise self._unreadable(descriptor.digest, what, exc) from exc
            yield BlobBody(start=offset, chunks=self._chunks(file, descriptor.digest, what))

    def _index(self) -> list[dict[str, Any]]:
        """Check the layout and load ``index.json`` entries; RegistryError names the path otherwise."""
        if self._entries is not None:
            return self._entries
        if not self.path.is_dir():
            raise RegistryError(f"OCI layout {self.path} for {self.host} does not exist", hint=_LAYOUT_HINT)
        if self._read_file(LAYOUT_FILE, MAX_LAYOUT_FILE_BYTES) is None:
            raise RegistryError(
                f"{self.path} is not an OCI image layout: it has no {LAYOUT_FILE} file", hint=_LAYOUT_HINT
            )
        index_path = self.path / INDEX_FILE
        content = self._read_file(INDEX_FILE, MAX_INDEX_BYTES)
        if content is None:
            raise RegistryError(f"OCI layout {self.path} has no {INDEX_FILE}", hint=_LAYOUT_HINT)
        try:
            if len(content) > MAX_INDEX_BYTES:
                raise InputLimitError(f"larger than {MAX_INDEX_BYTES} bytes")
            data = loads(content)
        except InputLimitError as exc:
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

    def _read_file(self, name: str, limit: int) -> bytes | None:
        """At most ``limit + 1`` bytes of the layout's file ``name``; None when it is absent."""
        try:
            return read_bounded(self.path, name, limit)
        except ReadError as exc:
            raise RegistryError(f"{self.describe()}: {exc.about(name)}", hint=exc.hint) from exc

    @staticmethod
    def _blob_name(digest: str, what: str) -> str:
        return f"blobs/sha256/{require_sha256(digest, what)}"

    def _unreadable(self, digest: str, what: str, exc: OSError | ReadError) -> RegistryError:
        """The error for a blob file of the layout that cannot be read: names the blob and the layout."""
        name = self._blob_name(digest, what)
        if isinstance(exc, ReadError):
            return RegistryError(f"{what} in {self.describe()}: {exc.about(name)}", hint=exc.hint)
        return RegistryError(
            f"{what} in {self.describe()}: cannot read {name}: {exc.strerror or exc}",
            hint="check the file's permissions and the disk it is on",
        )

    @contextlib.contextmanager
    def _open_blob(self, digest: str, what: str) -> Iterator[BinaryIO]:
        """The blob file of ``digest``, open for reading and closed on exit (see the module docstring)."""
        name = self._blob_name(digest, what)
        try:
            file = open_regular(self.path, name)
        except ReadError as exc:
            raise self._unreadable(digest, what, exc) from exc
        if file is None:
            raise NotFoundError(
                f"{what} not found in {self.describe()}",
                detail=f"missing file {name}",
                hint="copy the content into the layout again, e.g. with skopeo copy",
            )
        with file:
            yield file

    def _chunks(self, file: BinaryIO, digest: str, what: str) -> Iterator[bytes]:
        """The rest of ``file`` in CHUNK_SIZE pieces; a read error names the blob."""
        read = partial(file.read, CHUNK_SIZE)
        while True:
            try:
                chunk = read()
            except OSError as exc:
                raise self._unreadable(digest, what, exc) from exc
            if not chunk:
                return
            yield chunk

    def _read_blob(self, digest: str, size: int | None, what: str, limit: int | None = None) -> bytes:
        verifier = Verifier(digest, size, what, self.describe())
        chunks: list[bytes] = []
        read = 0
        # Chunked, so a file far larger than the expected size (or the limit, when the size is
        # not known) is rejected without being read whole.
        with self._open_blob(digest, what) as file:
            for chunk in self._chunks(file, digest, what):
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
