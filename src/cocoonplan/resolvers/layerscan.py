"""One streaming pass over each OCI layer a plan reads: where cocoon would find the kernel and
initrd in it and, when specs expect files, the layer's tree.

No answer is stored. Earlier versions kept the boot answer per layer under the cache
(``boot-scan/v2/<hex>.json``) and believed it, but the cache is often repository-relative,
so a pull request could commit a record that moves the planned kernel to another layer (or,
for a tree, makes a missing file look present). Of the two ways to make a record believable,
a MAC keyed by a per-user secret needs a key created, protected and found outside the
repository (and CI runners, which start without one, would gain nothing); re-deriving needs
nothing but the layer, which the digest-verified blob cache keeps anyway. So each answer is
taken from the cached blob in one pass that lists the tar while hashing it, and counts only
once the whole blob matched its digest; a layer is downloaded (verified, then cached) only
when the cache has no good copy. Answers are kept by layer digest for the run, so many specs
over the same layers read each layer once per plan.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, cast

from cocoonplan.errors import DigestMismatchError, ResolveError
from cocoonplan.oci.cache import BlobCache
from cocoonplan.oci.manifest import Descriptor
from cocoonplan.oci.reference import Reference
from cocoonplan.resolved import EntryKind, LayerEntry
from cocoonplan.resolvers.content import Content
from cocoonplan.resolvers.image import boot_files_in

MAX_ENTRIES = 2_000_000
"""Tar entries of one layer whose tree is kept; a full distribution with toolchains holds a
few hundred thousand."""
_CHUNK = 1 << 20
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class TreeEntry(NamedTuple):
    """One path of a layer, kept compact: a layer's tree may hold hundreds of thousands."""

    kind: EntryKind
    mode: int
    opaque: bool = False
    target: str | None = None
    sha256: str | None = None

    def entry(self) -> LayerEntry:
        """The entry as the plan's evidence records it."""
        return LayerEntry(
            kind=self.kind, mode=self.mode, opaque=self.opaque, target=self.target, sha256=self.sha256
        )


_IMPLIED = TreeEntry(EntryKind.DIRECTORY, 0o755)
"""A parent directory the tar does not list: made 0755, as Docker and cocoonplan's unpacker make it."""
_HIDDEN = TreeEntry(EntryKind.WHITEOUT, 0)


@dataclass(frozen=True)
class LayerScan:
    """What one pass over a layer found."""

    kernel: bool
    """It holds a kernel by cocoon's boot-file rules (``resolvers.image.boot_files_in``)."""
    initrd: bool
    entries: Mapping[str, TreeEntry] | None
    """The layer's own tree by absolute guest path, whiteouts as entries, parents the tar does
    not list as 0755 directories; None when the scan was not asked to keep it."""


def guest_path(name: str) -> str | None:
    """A tar entry name as an absolute guest path; None for one with ``..``, which never
    reaches a node (cocoonplan's unpacker refuses the layer)."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return None if ".." in parts else "/" + "/".join(parts)


class _Tree:
    """A layer's tree, built from its tar entries in order (a later entry replaces an earlier one)."""

    def __init__(self, hash_files: bool) -> None:
        self._hash = hash_files
        self._real: dict[str, TreeEntry] = {}
        self._whiteouts: set[str] = set()
        self._opaque: set[str] = set()

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path = guest_path(member.name)
        if path is None:
            return
        parent, _, base = path.rpartition("/")
        if base == _OPAQUE:
            self._opaque.add(parent or "/")
        elif base.startswith(_WHITEOUT):
            hidden = base.removeprefix(_WHITEOUT)
            # Other .wh..wh.* names are aufs bookkeeping, skipped as Docker skips them.
            if hidden not in ("", ".", "..") and not hidden.startswith(_WHITEOUT):
                self._whiteouts.add(f"{parent}/{hidden}")
        else:
            self._real[path] = self._entry(archive, member)

    def _entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> TreeEntry:
        mode = member.mode & 0o7777
        if member.type in _REGULAR or member.issparse():
            return TreeEntry(EntryKind.FILE, mode, sha256=self._digest(archive, member))
        if member.isdir():
            return TreeEntry(EntryKind.DIRECTORY, mode)
        if member.issym():
            return TreeEntry(EntryKind.SYMLINK, mode, target=member.linkname)
        if member.islnk():
            # The same file as an earlier entry of the layer; a link to anything else makes
            # cocoonplan's unpacker refuse the layer, so its content is not known here.
            target = self._real.get(guest_path(member.linkname) or "")
            return (
                target
                if target is not None and target.kind is EntryKind.FILE
                else TreeEntry(EntryKind.FILE, mode)
            )
        if member.ischr() and member.devmajor == member.devminor == 0:
            return _HIDDEN  # overlayfs's own whiteout, which the guest's overlay honours in a lower layer
        return TreeEntry(EntryKind.OTHER, mode)

    def _digest(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
        if not self._hash:
            return None
        source = archive.extractfile(member)
        digest = hashlib.sha256()
        while source is not None and (chunk := source.read(_CHUNK)):
            digest.update(chunk)
        return digest.hexdigest()

    def entries(self) -> dict[str, TreeEntry]:
        """The tree. A whiteout or opaque marker applies to the layers below: where the layer
        itself holds the whited-out path, its own entry stays (a directory then hides the
        lower one's entries, as an opaque one does)."""
        out = dict(self._real)
        _add_parents(out, list(out))
        for path in self._whiteouts:
            entry = out.get(path)
            if entry is None:
                out[path] = _HIDDEN
            elif entry.kind is EntryKind.DIRECTORY:
                out[path] = entry._replace(opaque=True)
        for path in self._opaque:
            entry = out.get(path, _IMPLIED)
            if entry.kind is EntryKind.DIRECTORY:
                out[path] = entry._replace(opaque=True)
        _add_parents(out, [*self._whiteouts, *self._opaque])
        return out


def _add_parents(tree: dict[str, TreeEntry], paths: list[str]) -> None:
    for path in paths:
        parent = posixpath.dirname(path)
        while parent not in tree:
            tree[parent] = _IMPLIED
            parent = posixpath.dirname(parent)


def _decoded(stream: BinaryIO, what: str) -> BinaryIO:
    """The tar inside a layer blob: plain or gzip (what OCI layers are, but for zstd).

    gzip is decoded by :class:`gzip.GzipFile`, not tarfile's stream mode, which copies its
    whole decompressed buffer on every 512-byte read (quadratic on well-compressed layers).
    """
    buffered = (
        stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(cast(io.RawIOBase, stream))
    )
    magic = buffered.peek(4)[:4]
    if magic.startswith(_GZIP):
        return cast(BinaryIO, gzip.GzipFile(fileobj=buffered, mode="rb"))
    if magic == _ZSTD:
        raise ResolveError(f"{what} is zstd-compressed, which cocoonplan does not read when planning")
    return cast(BinaryIO, buffered)


def scan_layer(stream: BinaryIO, what: str, *, keep: bool = False, hash_files: bool = False) -> LayerScan:
    """Read the layer tar ``stream`` once, in order; ``keep`` its tree, with each regular file's
    sha256 when ``hash_files``. Raises ResolveError naming ``what``."""
    tree = _Tree(hash_files) if keep else None
    kernel = initrd = False
    count = 0
    try:
        with tarfile.open(fileobj=_decoded(stream, what), mode="r|") as archive:
            for member in archive:
                count += 1
                found = boot_files_in([(member.name, member.type in (tarfile.REGTYPE, tarfile.AREGTYPE))])
                kernel, initrd = kernel or found[0], initrd or found[1]
                if tree is not None:
                    if count > MAX_ENTRIES:
                        raise ResolveError(
                            f"{what} holds more than {MAX_ENTRIES} entries; its tree is not listed",
                            hint="split the image into smaller layers",
                        )
                    tree.add(archive, member)
                # tarfile keeps every header it read, even in stream mode: a layer of a million
                # entries would hold a million TarInfo objects. Nothing here looks back.
                archive.members.clear()  # type: ignore[attr-defined]  # typeshed omits it
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ResolveError(f"{what} is not a readable tar layer: {exc}") from exc
    return LayerScan(kernel=kernel, initrd=initrd, entries=None if tree is None else tree.entries())


class LayerScanner:
    """Scans layers from their verified bytes (see the module docstring), each once per run.

    ``keep`` keeps every scanned layer's tree (specs expect files); ``hash_files`` hashes every
    regular file as it streams past (some spec expects a file's sha256): the one pass then
    answers any path's content, at about the cost of inflating the layer once more.
    """

    def __init__(
        self, content: Content, cache: Path, *, keep: bool = False, hash_files: bool = False
    ) -> None:
        self._content = content
        self._blobs = BlobCache(cache)
        self._keep = keep
        self._hash = hash_files
        self._scans: dict[str, LayerScan] = {}

    def scan(self, ref: Reference, layer: Descriptor) -> LayerScan:
        """The scan of one layer of ``ref``'s repository, from its verified bytes."""
        found = self._scans.get(layer.digest)
        if found is None:
            what = f"layer {layer.digest} of {ref.name}"
            found = self._scan_cached(layer, what) or self._scan_downloaded(ref, layer, what)
            self._scans[layer.digest] = found
        return found

    def _read(self, stream: BinaryIO, what: str) -> LayerScan:
        return scan_layer(stream, what, keep=self._keep, hash_files=self._hash)

    def _scan_cached(self, layer: Descriptor, what: str) -> LayerScan | None:
        try:
            with self._blobs.reading(layer) as stream:
                return None if stream is None else self._read(stream, what)
        except DigestMismatchError:
            return None  # dropped from the cache: download it again

    def _scan_downloaded(self, ref: Reference, layer: Descriptor, what: str) -> LayerScan:
        with tempfile.TemporaryDirectory(prefix="cocoonplan-layer-") as scratch:
            target = Path(scratch) / "layer"
            self._content.store_for(ref.registry).download_blob(ref.repository, layer, target)
            with target.open("rb") as stream:
                return self._read(stream, what)
