"""OCI manifests and indexes as frozen models, parsed from their exact bytes.

The digest of a manifest is the sha256 of the bytes the source served, so parsing always
starts from bytes and keeps the digest beside the parsed form.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, ValidationError

from cocoonplan.bounded import InputLimitError, loads
from cocoonplan.errors import ResolveError
from cocoonplan.model import Digest, Model, sha256_digest
from cocoonplan.units import MAX_SIZE


class MediaType(StrEnum):
    """Media types cocoonplan reads; values are the wire strings."""

    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    SNAPSHOT_ARTIFACT = "application/vnd.cocoonstack.snapshot.v1+json"
    SNAPSHOT_ARTIFACT_V2 = "application/vnd.cocoonstack.snapshot.v2+json"
    SNAPSHOT_CONFIG = "application/vnd.cocoonstack.snapshot.config.v1+json"


IMAGE_CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
"""Config media types of a bootable image (OCI and Docker)."""
MANIFEST_MEDIA_TYPES = (MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (MediaType.OCI_INDEX, MediaType.DOCKER_LIST)
ACCEPT_MANIFESTS = ", ".join((*MANIFEST_MEDIA_TYPES, *INDEX_MEDIA_TYPES))
TITLE_ANNOTATION = "org.opencontainers.image.title"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
BASE_IMAGE_ANNOTATION = "cocoonstack.snapshot.baseimage"
_MALFORMED_HINT = "its source serves it malformed: check the reference, or push the content again"


class Platform(Model):
    """The platform of an index entry."""

    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = Field(default=None, alias="os.version")
    os_features: tuple[str, ...] | None = Field(default=None, alias="os.features")


class Descriptor(Model):
    """A content descriptor: what a manifest says about one blob or child manifest."""

    media_type: str = Field(alias="mediaType")
    digest: Digest
    size: int = Field(ge=0, le=MAX_SIZE)
    annotations: dict[str, str] = Field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str | None = Field(default=None, alias="artifactType")
    urls: tuple[str, ...] | None = None
    data: str | None = None

    model_config = Model.model_config | {"populate_by_name": True, "extra": "ignore"}

    @property
    def title(self) -> str | None:
        """The ``org.opencontainers.image.title`` annotation (the file name of a snapshot layer)."""
        return self.annotations.get(TITLE_ANNOTATION)


class Manifest(Model):
    """An image or artifact manifest, with the digest of the exact bytes it came from."""

    digest: Digest
    media_type: str
    artifact_type: str | None
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    size: int


class Index(Model):
    """An image index (multi-platform list), with its digest."""

    digest: Digest
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str]


def _load_object(content: bytes, what: str) -> dict[str, Any]:
    try:
        data = loads(content)
    except InputLimitError as exc:
        raise ResolveError(f"{what} is {exc}", hint=_MALFORMED_HINT) from exc
    if not isinstance(data, dict):
        raise ResolveError(f"{what} is not a JSON object", hint=_MALFORMED_HINT)
    return data


def media_type_of(content: bytes, header_type: str | None, what: str) -> str:
    """Return a manifest's media type: its own ``mediaType`` field, else the served Content-Type."""
    declared = _load_object(content, what).get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if header_type:
        return header_type.split(";")[0].strip()
    raise ResolveError(f"{what} has no mediaType and none was served with it")


def parse_manifest(content: bytes, what: str, media_type: str | None = None) -> Manifest:
    """Parse an image/artifact manifest from its exact bytes; ``what`` names it in errors."""
    data = _load_object(content, what)
    # Every field is validated, so a manifest of any shape (layers: 5) is this error.
    try:
        return Manifest(
            digest=sha256_digest(content),
            media_type=str(data.get("mediaType") or media_type or MediaType.OCI_MANIFEST),
            artifact_type=data.get("artifactType"),
            config=data["config"],
            layers=data.get("layers") or (),
            annotations=data.get("annotations") or {},
            size=len(content),
        )
    except (KeyError, ValidationError) as exc:
        raise ResolveError(f"{what} is not a valid OCI manifest: {exc}", hint=_MALFORMED_HINT) from exc


def parse_index(content: bytes, what: str) -> Index:
    """Parse an image index from its exact bytes."""
    data = _load_object(content, what)
    try:
        return Index(
            digest=sha256_digest(content),
            media_type=str(data.get("mediaType") or MediaType.OCI_INDEX),
            manifests=data.get("manifests") or (),
            annotations=data.get("annotations") or {},
        )
    except ValidationError as exc:
        raise ResolveError(f"{what} is not a valid OCI index: {exc}", hint=_MALFORMED_HINT) from exc
