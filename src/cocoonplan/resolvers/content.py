"""Manifests and blobs by reference, across registry hosts, with indexes followed to one platform."""

from __future__ import annotations

from typing import Any, Protocol

from cocoonplan.bounded import InputLimitError, loads_written_by_go
from cocoonplan.errors import NotFoundError, ResolveError
from cocoonplan.oci.manifest import INDEX_MEDIA_TYPES, Descriptor, Manifest, parse_index, parse_manifest
from cocoonplan.oci.reference import Reference
from cocoonplan.oci.store import ContentStore, RawManifest
from cocoonplan.project import Arch

OS = "linux"
"""The OS of every platform picked from an index: cocoon pulls ``linux/<host GOARCH>``."""
MAX_JSON_BLOB = 16 << 20
"""Largest JSON file (cocoon.json, config.json, config blob) read into memory."""


def _platform_child(ref: Reference, raw: RawManifest, arch: Arch) -> Descriptor:
    # The first match in index order, as cocoon's puller (go-containerregistry) takes it; the
    # child is fixed by the index's bytes, so a pinned index digest pins every node's manifest.
    labelled = ref.with_digest(raw.digest)
    index = parse_index(raw.content, f"index {labelled}")
    child = next(
        (m for m in index.manifests if m.platform and (m.platform.os, m.platform.architecture) == (OS, arch)),
        None,
    )
    if child is None:
        platforms = (m.platform for m in index.manifests if m.platform)
        offered = ", ".join(
            dict.fromkeys("/".join(filter(None, (p.os, p.architecture, p.variant))) for p in platforms)
        )
        raise NotFoundError(
            f"index {labelled} has no {OS}/{arch} manifest; it offers {offered or 'no platforms'}",
            hint=f"push a {OS}/{arch} build under this reference, or plan the VM on a node whose "
            "`arch` (cocoonplan.yaml) the index offers",
        )
    return child


class StoreLookup(Protocol):
    """Finds the content store serving a registry host (``cocoonplan.oci.sources.Sources``)."""

    def store_for(self, host: str) -> ContentStore:
        """The store for ``host``."""
        ...


class Content:
    """Reads manifests and blobs for references through the project's sources."""

    def __init__(self, sources: StoreLookup) -> None:
        self._sources = sources

    def digest(self, ref: Reference) -> str:
        """The digest ``ref`` names at its source, not following an index: what a tag is pinned to."""
        return self._sources.store_for(ref.registry).get_manifest(ref.repository, ref.selector).digest

    def manifest(self, ref: Reference, arch: Arch, selector: str | None = None) -> Manifest:
        """Fetch the manifest ``selector`` (default: the reference's digest or tag), following an
        index to its ``linux/<arch>`` child.

        The returned manifest's digest is the platform manifest's, as cocoon records it.
        """
        store = self._sources.store_for(ref.registry)
        raw = store.get_manifest(ref.repository, selector or ref.selector)
        if raw.media_type in INDEX_MEDIA_TYPES:
            raw = store.get_manifest(ref.repository, _platform_child(ref, raw, arch).digest)
        return parse_manifest(raw.content, f"manifest {ref.name}@{raw.digest}", raw.media_type)

    def blob(self, ref: Reference, descriptor: Descriptor) -> bytes:
        """Fetch a small blob (at most 16 MiB), verified against its descriptor."""
        if descriptor.size > MAX_JSON_BLOB:
            raise ResolveError(
                f"blob {descriptor.digest} of {ref.name} is {descriptor.size} bytes; at most {MAX_JSON_BLOB} are read for planning",
                hint="cocoon.json, config.json and config blobs are small; the artifact is malformed",
            )
        return self._sources.store_for(ref.registry).get_blob(ref.repository, descriptor)

    def json_blob(self, ref: Reference, descriptor: Descriptor, what: str) -> Any:
        """Fetch and decode a JSON blob, keeping key order, within the bounds of :func:`loads`.

        Every JSON file of an artifact was written by Go or serde: NaN, Infinity and a key
        written twice mean it was not, and are refused rather than guessed at."""
        data = self.blob(ref, descriptor)
        try:
            return loads_written_by_go(data)
        except InputLimitError as exc:
            raise ResolveError(
                f"{what} ({descriptor.digest} in {ref.name}) is {exc}",
                hint="the artifact is malformed: push it again, or plan from another reference",
            ) from exc

    def store_for(self, host: str) -> ContentStore:
        """The store serving ``host`` (for streaming layer downloads)."""
        return self._sources.store_for(host)
