"""Manifests and blobs by reference, across registry hosts, with indexes followed to one platform."""

from __future__ import annotations

import json
from typing import Any, Protocol

from cocoonplan.errors import ResolveError
from cocoonplan.oci.manifest import INDEX_MEDIA_TYPES, Descriptor, Manifest, parse_index, parse_manifest
from cocoonplan.oci.reference import Reference
from cocoonplan.oci.store import ContentStore

PLATFORM = ("linux", "amd64")
"""The platform picked from an index: cocoon pulls ``linux/<host GOARCH>``; nodes are amd64."""
MAX_JSON_BLOB = 16 << 20
"""Largest JSON file (cocoon.json, config.json, config blob) read into memory."""


class StoreLookup(Protocol):
    """Finds the content store serving a registry host (``cocoonplan.oci.sources.Sources``)."""

    def store_for(self, host: str) -> ContentStore:
        """The store for ``host``."""
        ...


class Content:
    """Reads manifests and blobs for references through the project's sources."""

    def __init__(self, sources: StoreLookup) -> None:
        self._sources = sources

    def manifest(self, ref: Reference, selector: str | None = None) -> Manifest:
        """Fetch the manifest ``selector`` (default: the reference's digest or tag), following an index.

        The returned manifest's digest is the platform manifest's, as cocoon records it.
        """
        store = self._sources.store_for(ref.registry)
        raw = store.get_manifest(ref.repository, selector or ref.selector)
        what = f"manifest {ref.name}@{raw.digest}"
        if raw.media_type in INDEX_MEDIA_TYPES:
            index = parse_index(raw.content, what)
            child = next(
                (
                    m
                    for m in index.manifests
                    if m.platform and (m.platform.os, m.platform.architecture) == PLATFORM
                ),
                None,
            )
            if child is None:
                raise ResolveError(
                    f"index {ref.name}@{raw.digest} has no {'/'.join(PLATFORM)} manifest",
                    hint="cocoon nodes run linux/amd64; push an image for that platform",
                )
            raw = store.get_manifest(ref.repository, child.digest)
            what = f"manifest {ref.name}@{raw.digest}"
        return parse_manifest(raw.content, what, raw.media_type)

    def blob(self, ref: Reference, descriptor: Descriptor) -> bytes:
        """Fetch a small blob (at most 16 MiB), verified against its descriptor."""
        if descriptor.size > MAX_JSON_BLOB:
            raise ResolveError(
                f"blob {descriptor.digest} of {ref.name} is {descriptor.size} bytes; at most {MAX_JSON_BLOB} are read for planning",
                hint="cocoon.json, config.json and config blobs are small; the artifact is malformed",
            )
        return self._sources.store_for(ref.registry).get_blob(ref.repository, descriptor)

    def json_blob(self, ref: Reference, descriptor: Descriptor, what: str) -> Any:
        """Fetch and decode a JSON blob, keeping key order."""
        data = self.blob(ref, descriptor)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResolveError(
                f"{what} ({descriptor.digest} in {ref.name}) is not valid JSON: {exc}"
            ) from exc

    def store_for(self, host: str) -> ContentStore:
        """The store serving ``host`` (for streaming layer downloads)."""
        return self._sources.store_for(host)
