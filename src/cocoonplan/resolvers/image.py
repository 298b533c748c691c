"""Resolve an OCI image: its platform manifest, layers, and where cocoon would find the kernel."""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import tempfile
from pathlib import Path

from cocoonplan.errors import ResolveError
from cocoonplan.model import digest_hex
from cocoonplan.oci.manifest import IMAGE_CONFIG_TYPES, Descriptor, Manifest
from cocoonplan.oci.reference import Reference
from cocoonplan.project import Arch
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedImage
from cocoonplan.resolvers.content import Content

SCAN_RULES = "v2"
"""The version of the boot-file rules below; bump it whenever they change."""


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


def _scan_layer(path: Path, what: str) -> tuple[bool, bool]:
    try:
        with tarfile.open(path, mode="r:*") as archive:
            entries = [(m.name, m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)) for m in archive]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ResolveError(f"{what} is not a readable tar layer: {exc}") from exc
    return boot_files_in(entries)


class BootScanner:
    """Finds boot files in layers, remembering each layer's answer by digest under ``cache``."""

    def __init__(self, content: Content, cache: Path) -> None:
        self._content = content
        self._cache = cache

    def scan(self, ref: Reference, layer: Descriptor) -> tuple[bool, bool]:
        """(has kernel, has initrd) for one layer; downloads it once, verified."""
        # Versioned by the rules: a record written under other rules is never trusted.
        record = self._cache / "boot-scan" / SCAN_RULES / f"{digest_hex(layer.digest)}.json"
        try:
            found = json.loads(record.read_text())
            return bool(found["kernel"]), bool(found["initrd"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not scanned yet, or a damaged record: scan again

        with tempfile.TemporaryDirectory(prefix="cocoonplan-layer-") as scratch:
            target = Path(scratch) / "layer"
            self._content.store_for(ref.registry).download_blob(ref.repository, layer, target)
            kernel, initrd = _scan_layer(target, f"layer {layer.digest} of {ref.name}")
        record.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of its own: plans sharing a cache may scan the same layer at once.
        handle, temp = tempfile.mkstemp(dir=record.parent, prefix=f".{record.name}.")
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps({"kernel": kernel, "initrd": initrd}))
        Path(temp).replace(record)
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
    content: Content, ref: Reference, label: str, arch: Arch, scanner: BootScanner | None
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
            has_kernel, has_initrd = scanner.scan(ref, layer)
            kernel = layer.digest if has_kernel else kernel
            initrd = layer.digest if has_initrd else initrd
    return ResolvedImage(
        pinned=PinnedRef(ref=label, digest=manifest.digest),
        repository=ref.name,
        layers=blob_refs(ref, manifest),
        kernel_layer=kernel,
        initrd_layer=initrd,
    )
