"""Resolve an OCI image: its platform manifest, layers, and where cocoon would find the kernel."""

from __future__ import annotations

import posixpath
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from cocoonplan.errors import DigestMismatchError, ResolveError
from cocoonplan.oci.cache import BlobCache
from cocoonplan.oci.manifest import IMAGE_CONFIG_TYPES, Descriptor, Manifest
from cocoonplan.oci.reference import Reference
from cocoonplan.project import Arch
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedImage
from cocoonplan.resolvers.content import Content


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


def _scan_layer(stream: BinaryIO, what: str) -> tuple[bool, bool]:
    # Stream mode ("r|*"): one sequential pass, so a layer can be listed while it is hashed.
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            entries = [(m.name, m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)) for m in archive]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ResolveError(f"{what} is not a readable tar layer: {exc}") from exc
    return boot_files_in(entries)


class BootScanner:
    """Finds boot files in layers, deriving each layer's answer from its verified bytes.

    No answer is stored. Earlier versions kept one per layer under the cache
    (``boot-scan/v2/<hex>.json``) and believed it, but the cache is often repository-relative,
    so a pull request could commit a record that moves the planned kernel to another layer.
    Of the two ways to make a record believable, a MAC keyed by a per-user secret needs a key
    created, protected and found outside the repository (and CI runners, which start without
    one, would gain nothing); re-deriving needs nothing but the layer, which the digest-verified
    blob cache keeps anyway. So the answer is taken from the cached blob in one streaming pass
    that lists the tar while hashing it, and counts only once the whole blob matched its
    digest; a layer is downloaded (verified, then cached) only when the cache has no good copy.
    The cost is one read of each layer per plan; answers are remembered for the run.
    """

    def __init__(self, content: Content, cache: Path) -> None:
        self._content = content
        self._blobs = BlobCache(cache)
        self._answers: dict[str, tuple[bool, bool]] = {}

    def scan(self, ref: Reference, layer: Descriptor) -> tuple[bool, bool]:
        """(has kernel, has initrd) for one layer, from its verified bytes."""
        answer = self._answers.get(layer.digest)
        if answer is None:
            what = f"layer {layer.digest} of {ref.name}"
            answer = self._scan_cached(layer, what)
            if answer is None:
                answer = self._scan_downloaded(ref, layer, what)
            self._answers[layer.digest] = answer
        return answer

    def _scan_cached(self, layer: Descriptor, what: str) -> tuple[bool, bool] | None:
        try:
            with self._blobs.reading(layer) as stream:
                return None if stream is None else _scan_layer(stream, what)
        except DigestMismatchError:
            return None  # dropped from the cache: download it again

    def _scan_downloaded(self, ref: Reference, layer: Descriptor, what: str) -> tuple[bool, bool]:
        with tempfile.TemporaryDirectory(prefix="cocoonplan-layer-") as scratch:
            target = Path(scratch) / "layer"
            self._content.store_for(ref.registry).download_blob(ref.repository, layer, target)
            with target.open("rb") as stream:
                return _scan_layer(stream, what)


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
