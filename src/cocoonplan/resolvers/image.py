"""Resolve an OCI image: its platform manifest, layers, and where cocoon would find the kernel."""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from cocoonplan.errors import ResolveError
from cocoonplan.model import digest_hex
from cocoonplan.oci.manifest import Descriptor, Manifest
from cocoonplan.oci.reference import Reference
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedImage
from cocoonplan.resolvers.content import Content


def boot_files_in(names_and_types: list[tuple[str, bool]]) -> tuple[bool, bool]:
    """Whether a layer's entries hold a kernel and an initrd, by cocoon's rules (§3.4).

    Only regular files count; after cleaning, the directory must be exactly ``boot``; the
    name starts with ``vmlinuz`` or ``initrd.img`` and does not end in ``.old``.
    """
    kernel = initrd = False
    for name, regular in names_and_types:
        if not regular or name.startswith("/"):
            continue
        path = PurePosixPath(name)
        parent = str(path.parent)
        if parent not in ("boot", "./boot") or path.name.endswith(".old"):
            continue
        kernel = kernel or path.name.startswith("vmlinuz")
        initrd = initrd or path.name.startswith("initrd.img")
    return kernel, initrd


def _scan_layer(path: Path, what: str) -> tuple[bool, bool]:
    try:
        with tarfile.open(path, mode="r:*") as archive:
            entries = [(member.name, member.isreg()) for member in archive]
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
        record = self._cache / "boot-scan" / f"{digest_hex(layer.digest)}.json"
        if record.is_file():
            found = json.loads(record.read_text())
            return bool(found["kernel"]), bool(found["initrd"])
        with tempfile.TemporaryDirectory(prefix="cocoonplan-layer-") as scratch:
            target = Path(scratch) / "layer"
            self._content.store_for(ref.registry).download_blob(ref.repository, layer, target)
            kernel, initrd = _scan_layer(target, f"layer {layer.digest} of {ref.name}")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"kernel": kernel, "initrd": initrd}))
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


def resolve_image(content: Content, ref: Reference, label: str, scanner: BootScanner | None) -> ResolvedImage:
    """Resolve the image ``ref`` (pinned by digest) and, with a scanner, locate its boot layers.

    As cocoon does, the last layer in manifest order holding a kernel (initrd) wins.
    """
    manifest = content.manifest(ref)
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
