"""Resolve a cocoon hot-snapshot artifact: its config blob, cocoon.json, config.json and base image."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cocoonplan.cocoon import SnapshotConfig, SnapshotMeta
from cocoonplan.errors import ReferenceFormatError, ResolveError
from cocoonplan.oci.manifest import BASE_IMAGE_ANNOTATION, MediaType
from cocoonplan.oci.reference import Reference, parse_reference
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedImage, ResolvedSnapshot
from cocoonplan.resolvers.content import Content
from cocoonplan.resolvers.image import blob_refs

REQUIRED_FILES = ("cocoon.json", "config.json")


def _base_repository(config: SnapshotConfig, annotations: dict[str, str], what: str) -> Reference | None:
    label = config.image or annotations.get(BASE_IMAGE_ANNOTATION)
    if not label or not config.image_digest:
        return None
    try:
        return parse_reference(label).with_digest(config.image_digest)
    except ReferenceFormatError as exc:
        raise ResolveError(f"{what} records base image {label!r}, which is not an OCI reference") from exc


def _resolve_base(content: Content, ref: Reference | None, label: str | None) -> ResolvedImage | None:
    # Fetched by the recorded digest, never by the tag: a tag may since name other layers.
    if ref is None:
        return None
    manifest = content.manifest(ref, ref.digest)
    return ResolvedImage(
        pinned=PinnedRef(ref=label or ref.name, digest=manifest.digest),
        repository=ref.name,
        layers=blob_refs(ref, manifest),
    )


def resolve_snapshot(content: Content, ref: Reference, label: str) -> ResolvedSnapshot:
    """Resolve the snapshot ``ref`` (pinned by digest) and the files a plan is made from."""
    manifest = content.manifest(ref)
    what = f"snapshot {label}@{manifest.digest}"
    kind = manifest.artifact_type or manifest.config.media_type
    if kind == MediaType.SNAPSHOT_ARTIFACT_V2:
        raise ResolveError(
            f"{what} is a v2 (chunked/zstd) cocoon snapshot, which cocoonplan cannot plan yet",
            hint="push the snapshot in v1 format (epoch push)",
        )
    if kind not in (MediaType.SNAPSHOT_ARTIFACT, MediaType.SNAPSHOT_CONFIG):
        raise ResolveError(
            f"{label} is not a cocoon snapshot artifact (artifactType {kind})",
            hint="use `image:` for an OCI image, `snapshot:` for an artifact pushed by epoch",
        )
    try:
        config = SnapshotConfig.model_validate(content.json_blob(ref, manifest.config, f"{what} config blob"))
    except ValidationError as exc:
        raise ResolveError(f"{what}: config blob is not a cocoon snapshot config: {exc}") from exc
    by_title = {layer.title: layer for layer in manifest.layers if layer.title}
    missing = [name for name in REQUIRED_FILES if name not in by_title]
    if missing:
        raise ResolveError(
            f"{what} has no {', '.join(missing)} layer", hint="re-push the snapshot with epoch"
        )
    meta_data: Any = content.json_blob(ref, by_title["cocoon.json"], f"{what} cocoon.json")
    ch_config: Any = content.json_blob(ref, by_title["config.json"], f"{what} config.json")
    if not isinstance(ch_config, dict):
        raise ResolveError(f"{what}: config.json is not a JSON object")
    try:
        meta = SnapshotMeta.model_validate(meta_data)
    except ValidationError as exc:
        raise ResolveError(f"{what}: cocoon.json is not a cocoon snapshot sidecar: {exc}") from exc
    base_ref = _base_repository(config, manifest.annotations, what)
    return ResolvedSnapshot(
        pinned=PinnedRef(ref=label, digest=manifest.digest),
        repository=ref.name,
        artifact_type=manifest.artifact_type,
        annotations=manifest.annotations,
        config=config,
        files=tuple(
            BlobRef(digest=f.digest, size=f.size, media_type=f.media_type, source=ref.name, title=f.title)
            for f in manifest.layers
        ),
        meta=meta,
        ch_config=ch_config,
        base_image=_resolve_base(content, base_ref, config.image),
    )
