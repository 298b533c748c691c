"""Resolve a cocoon hot-snapshot artifact: its config blob, cocoon.json, config.json and base image."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cocoonplan.cocoon import SnapshotConfig, SnapshotMeta
from cocoonplan.errors import ReferenceFormatError, ResolveError
from cocoonplan.oci.manifest import BASE_IMAGE_ANNOTATION, Descriptor, MediaType
from cocoonplan.oci.reference import Reference, parse_reference
from cocoonplan.project import Arch
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedImage, ResolvedSnapshot
from cocoonplan.resolvers.content import Content
from cocoonplan.resolvers.image import blob_refs

REQUIRED_FILES = ("cocoon.json", "config.json")


def _problems(exc: ValidationError) -> str:
    """pydantic's errors on one line, ``field: message`` each (its own text spans lines)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(document)'}: {e['msg']}" for e in exc.errors())


def _base_repository(config: SnapshotConfig, annotations: dict[str, str], what: str) -> Reference | None:
    label = config.image or annotations.get(BASE_IMAGE_ANNOTATION)
    if not label or not config.image_digest:
        return None
    try:
        return parse_reference(label).with_digest(config.image_digest)
    except ReferenceFormatError as exc:
        raise ResolveError(f"{what} records base image {label!r}, which is not an OCI reference") from exc


def _resolve_base(
    content: Content, ref: Reference | None, label: str | None, arch: Arch
) -> ResolvedImage | None:
    # Fetched by the recorded digest, never by the tag: a tag may since name other layers.
    if ref is None:
        return None
    manifest = content.manifest(ref, arch, ref.digest)
    return ResolvedImage(
        pinned=PinnedRef(ref=label or ref.name, digest=manifest.digest),
        repository=ref.name,
        layers=blob_refs(ref, manifest),
    )


def _check_kind(config: SnapshotConfig, what: str) -> None:
    if config.hypervisor and config.hypervisor != "cloud-hypervisor":
        raise ResolveError(
            f"{what} is a {config.hypervisor} snapshot; cocoonplan plans Cloud Hypervisor clones only",
            hint="clone it with cocoon directly, or bake a Cloud Hypervisor snapshot",
        )
    if config.image_type and config.image_type != "oci":
        raise ResolveError(
            f"{what} was baked from a {config.image_type} image; cocoonplan plans snapshots of OCI images only",
            hint="cloud-image (qcow2) snapshots are not supported yet",
        )


def _files_by_title(layers: tuple[Descriptor, ...], what: str) -> dict[str, Descriptor]:
    # Titles become file names when the snapshot is imported: each must be a plain, unique name.
    by_title: dict[str, Descriptor] = {}
    for layer in layers:
        title = layer.title
        if not title or "/" in title or title in (".", "..") or "\0" in title:
            raise ResolveError(f"{what}: layer {layer.digest} has no usable file name (title {title!r})")
        if title in by_title:
            raise ResolveError(f"{what}: two layers are titled {title!r}")
        by_title[title] = layer
    return by_title


def resolve_snapshot(content: Content, ref: Reference, label: str, arch: Arch) -> ResolvedSnapshot:
    """Resolve the snapshot ``ref`` (pinned by digest) for a node of ``arch`` and the files a
    plan is made from; an index resolves to its ``linux/<arch>`` artifact."""
    manifest = content.manifest(ref, arch)
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
        raise ResolveError(f"{what}: config blob is not a cocoon snapshot config: {_problems(exc)}") from exc
    _check_kind(config, what)
    by_title = _files_by_title(manifest.layers, what)
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
        raise ResolveError(f"{what}: cocoon.json is not a cocoon snapshot sidecar: {_problems(exc)}") from exc
    base_ref = _base_repository(config, manifest.annotations, what)
    return ResolvedSnapshot(
        pinned=PinnedRef(ref=label, digest=manifest.digest),
        repository=ref.name,
        artifact_type=manifest.artifact_type,
        annotations=manifest.annotations,
        config=config,
        config_blob=BlobRef(
            digest=manifest.config.digest,
            size=manifest.config.size,
            media_type=manifest.config.media_type,
            source=ref.name,
        ),
        files=tuple(
            BlobRef(digest=f.digest, size=f.size, media_type=f.media_type, source=ref.name, title=f.title)
            for f in manifest.layers
        ),
        meta=meta,
        ch_config=ch_config,
        base_image=_resolve_base(content, base_ref, config.image, arch),
    )
