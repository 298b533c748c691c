"""Resolve an OCI image: its platform manifest, layers, and where cocoon would find the kernel."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from cocoonplan.errors import ResolveError
from cocoonplan.oci.manifest import IMAGE_CONFIG_TYPES, Manifest
from cocoonplan.oci.reference import Reference
from cocoonplan.project import Arch
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedImage
from cocoonplan.resolvers.content import Content

if TYPE_CHECKING:
    # layerscan applies boot_files_in, so it imports this module.
    from cocoonplan.resolvers.layerscan import LayerScanner


def boot_files_in(names_and_types: list[tuple[str, bool]]) -> tuple[bool, bool]:
    """Whether a layer's entries hold a kernel and an initrd, by cocoon's rules (§3.4).

    Only regular files count (tar type ``0`` or the legacy ``\\0``: no symlinks or hard
    links); after cleaning the name as Go's ``filepath.Clean`` does, its directory must be
    exactly ``boot`` or ``.``; the base name starts with ``vmlinuz`` or ``initrd.img`` and does
    not end in ``.old``. Absolute names never match.
    """
    kernel = initrd = False
    for name, regular in names_and_types:
        if not regular or name.startswith("/"):
            continue
        directory, base = posixpath.split(posixpath.normpath(name))
        if directory not in ("boot", "") or base.endswith(".old"):
            continue
        kernel = kernel or base.startswith("vmlinuz")
        initrd = initrd or base.startswith("initrd.img")
    return kernel, initrd


def blob_refs(ref: Reference, manifest: Manifest) -> tuple[BlobRef, ...]:
    """The layers of ``manifest`` as blob references in ``ref``'s repository."""
    return tuple(
        BlobRef(
            digest=layer.digest,
            size=layer.size,
            media_type=layer.media_type,
            source=ref.name,
            title=layer.title,
        )
        for layer in manifest.layers
    )


def resolve_image(
    content: Content, ref: Reference, label: str, arch: Arch, scanner: LayerScanner | None
) -> ResolvedImage:
    """Resolve the image ``ref`` (pinned by digest) for a node of ``arch`` and, with a scanner,
    locate its boot layers.

    As cocoon does, the last layer in manifest order holding a kernel (initrd) wins. Only the
    layers of the ``arch`` manifest are scanned; a layer's answer is kept by its digest alone,
    because the boot-file rules do not depend on the architecture.
    """
    manifest = content.manifest(ref, arch)
    # Refuse anything but an image before downloading layers: a snapshot artifact's "layers"
    # are disk and memory files of many GiB.
    if manifest.config.media_type not in IMAGE_CONFIG_TYPES or manifest.artifact_type:
        kind = manifest.artifact_type or manifest.config.media_type
        raise ResolveError(
            f"{label}@{manifest.digest} is not an OCI image (config {manifest.config.media_type}, type {kind})",
            hint="run mode boots an OCI image; a cocoon snapshot is cloned with `snapshot:`",
        )
    kernel = initrd = None
    if scanner is not None:
        for layer in manifest.layers:
            scan = scanner.scan(ref, layer)
            kernel = layer.digest if scan.kernel else kernel
            initrd = layer.digest if scan.initrd else initrd
    return ResolvedImage(
        pinned=PinnedRef(ref=label, digest=manifest.digest),
        repository=ref.name,
        layers=blob_refs(ref, manifest),
        kernel_layer=kernel,
        initrd_layer=initrd,
    )
