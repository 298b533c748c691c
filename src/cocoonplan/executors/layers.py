"""Layers as ``cocoon image pull`` leaves them (reference §3.3, §3.4, §3.6).

- :func:`convert_layer` turns one verified OCI layer blob into ``<root>/oci/blobs/<hex>.erofs``
  with cocoon's ``mkfs.erofs`` flags and UUID, and extracts its boot files into
  ``<root>/oci/boot/<hex>/`` by cocoon's rules, in one pass over the tar;
  :func:`convert_layers` converts many, up to the core count at once.
- :func:`record_image` writes an ``oci/db/images.json`` entry as cocoon v0.3.8's JSON engine
  does: under an flock on ``images.lock``, the whole file rewritten atomically.

erofs-utils 1.5 has no ``--tar``, so a layer is unpacked into a private scratch directory under
``<root>/oci/temp`` (where cocoon's pulls put theirs) and built from there. A layer is untrusted
input, and unpacking is where it could write outside the scratch directory, so:

- every entry is created relative to its parent's descriptor, each directory on the way opened
  with ``O_NOFOLLOW``: a symbolic link the layer created is kept as a link, whatever it points
  at (``/usr/bin/x -> /etc/alternatives/x`` is ordinary), and never followed; an entry *below*
  one (``d -> /etc``, then ``d/passwd``) is refused;
- absolute names, ``..`` components, and hard links whose target is absolute, contains ``..``
  or is not an earlier non-directory entry of the layer are refused;
- content is bounded (:class:`UnpackLimits`): declared file bytes and entries, checked before
  anything is read, so a header declaring 1 TiB is refused at once;
- a refusal is an :class:`~cocoonplan.errors.ApplyError` naming the layer digest and the entry,
  and nothing is published: the scratch directory is removed, no final name is touched.

What the EROFS keeps, as cocoon's ``mkfs.erofs --tar=f`` would: modes, uids and gids as the tar
gives them (``--all-root`` is not cocoon's flag), ``SCHILY.xattr.*`` extended attributes,
character and block devices and FIFOs (created as they are: inert in an image, and what the
tar holds). OCI whiteouts become what an overlay lower layer needs: ``.wh.NAME`` a 0:0
character device ``NAME``, ``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` attribute on its
directory; other ``.wh..wh.*`` names are aufs bookkeeping, skipped as Docker skips them. An
``trusted.overlay.*`` attribute carried by the tar itself is refused: only the whiteout
conversion may say what overlay hides. Ownership, device nodes and ``trusted.*`` attributes
need root (cocoon runs as root too).

Files are published with :mod:`cocoonplan.atomic` (exclusive temporary, fsync, rename, never
through a link): the boot files first, the EROFS last, so an ``.erofs`` on the node means its
layer's boot files are there too, and a crash at any point leaves at worst a stale scratch
directory under ``oci/temp``, never a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydantic import Field

from cocoonplan.atomic import (
    NotLinkableError,
    atomic_writer,
    check_target,
    link_writer,
    read_bounded,
    write_atomic,
)
from cocoonplan.bounded import InputLimitError, loads_written_by_go
from cocoonplan.cocoon import MetadataEngine
from cocoonplan.errors import ApplyError
from cocoonplan.model import DIGEST_PATTERN, Model
from cocoonplan.nodefs import Cap, Tree
from cocoonplan.resolvers.image import boot_files_in
from cocoonplan.resolvers.metastore import IMAGES, detect_engine, meta_files_present
from cocoonplan.resolvers.node import BLOBS_DIR, BOOT_DIR, BOOT_FILES

MKFS_EROFS = "mkfs.erofs"
MKFS_FLAGS = ("-zlz4hc", "-C4096", "-T0")
"""cocoon's flags (§3.3), besides ``--tar=f`` (1.7+ only) and ``-U``."""
TEMP_DIR = "oci/temp"
IMAGES_LOCK = str(Path(IMAGES.file).with_suffix(".lock"))

_KERNEL, _INITRD = BOOT_FILES
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_DIGEST = re.compile(DIGEST_PATTERN)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_OVERLAY_XATTRS = "trusted.overlay."
_PAX_XATTR = "SCHILY.xattr."
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_DEVICES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
_REFUSED_HINT = (
    "the layer cannot be unpacked safely, so it is not installed: rebuild the image without "
    "that entry, or check where the image came from"
)


class UnpackLimits(Model):
    """Bounds on one layer's unpacked content, checked against each tar header before reading."""

    max_bytes: int = Field(default=64 << 30, gt=0)
    """Declared bytes of regular files in all; the largest real layers (CUDA, desktops) hold
    a few tens of GiB."""
    max_entries: int = Field(default=2_000_000, gt=0)
    """Tar entries; a full distribution with toolchains holds a few hundred thousand."""


class LayerBlob(Model):
    """A verified layer blob on this machine and the manifest digest that names it."""

    digest: str = Field(pattern=DIGEST_PATTERN)
    path: Path


class ConvertedLayer(Model):
    """What :func:`convert_layer` installed for one layer."""

    digest: str
    erofs: Path
    """``<root>/oci/blobs/<hex>.erofs``."""
    erofs_size: int
    kernel: bool
    """Whether ``<root>/oci/boot/<hex>/vmlinuz`` was extracted from this layer."""
    initrd: bool
    """Whether ``<root>/oci/boot/<hex>/initrd.img`` was extracted from this layer."""


class ImageLayer(Model):
    """A layer of an ``images.json`` entry."""

    digest: str


class ImageRecord(Model):
    """An ``oci/db/images.json`` entry; fields in cocoon's struct order, which Go keeps."""

    ref: str
    manifest_digest: str
    layers: tuple[ImageLayer, ...]
    kernel_layer: str
    initrd_layer: str
    size: int
    created_at: str


def erofs_uuid(hex_: str) -> str:
    """The EROFS UUID cocoon gives a pulled layer: UUIDv5 in the URL namespace of its hex (§3.3)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, hex_))


def _hex(digest: str) -> str:
    # The hex becomes a file name under the node root: nothing but a digest may get there.
    if not _DIGEST.fullmatch(digest):
        raise ApplyError(
            f"{digest!r} is not a sha256 digest", hint="name layers and manifests by sha256:<64 hex>"
        )
    return digest.removeprefix("sha256:")


# --------------------------------------------------------------------------- scratch and publishing


def _real_directory(root: Path, rel: str) -> Path:
    """``root/rel``, created when missing, refused when a component below ``root`` is a link.

    The check and the creation are two steps; the node root belongs to root, which is who
    runs apply, so nobody else can swap a component in between.
    """
    # check_target refuses a link on any directory of the name; the leaf is never created.
    check_target(root, f"{rel}/.cocoonplan-probe")
    path = root / rel
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApplyError(f"cannot create {path}: {exc.strerror or exc}", hint="check the node root") from exc
    return path


def _publish(root: Path, rel: str, source: Path) -> None:
    with atomic_writer(root, rel) as out, source.open("rb") as data:
        while chunk := data.read(_CHUNK):
            out.write(chunk)


def _publish_erofs(root: Path, rel: str, erofs: Path) -> None:
    # The scratch directory is under the node root, on the same file system as a rule: the
    # EROFS mkfs.erofs wrote (0644, as the atomic writer's copy would be) is hard-linked into
    # place, not copied, once it is durable; copied where the file system refuses the link.
    with erofs.open("rb") as data:
        try:
            os.fsync(data.fileno())
            with link_writer(data.fileno(), root, rel):
                return
        except NotLinkableError:
            pass
        except OSError as exc:
            raise ApplyError(
                f"cannot write {root / rel}: {exc.strerror or exc}",
                hint="check the space under the node root",
            ) from exc
    _publish(root, rel, erofs)


# --------------------------------------------------------------------------- reading the blob


def _zstd(blob: BinaryIO, digest: str) -> IO[bytes]:
    try:
        zstd = importlib.import_module("compression.zstd")  # Python 3.14 and later
    except ImportError:
        raise ApplyError(
            f"layer {digest} is zstd-compressed, and this Python has no zstd decoder",
            hint="run cocoonplan on Python 3.14 or later (compression.zstd), or pull that image with `cocoon image pull`",
        ) from None
    stream: IO[bytes] = zstd.ZstdFile(blob)
    return stream


@contextlib.contextmanager
def _layer_tar(blob: Path, digest: str) -> Iterator[tarfile.TarFile]:
    """The tar of a layer blob, read once in order: plain, gzip, or zstd where Python has it
    (the compressions OCI layers use; cocoon's puller decodes the same)."""
    with blob.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        source = _zstd(raw, digest) if magic == _ZSTD_MAGIC else raw
        gzipped = magic.startswith(_GZIP_MAGIC)
        with tarfile.open(fileobj=source, mode="r|gz" if gzipped else "r|") as archive:
            yield archive


# --------------------------------------------------------------------------- unpacking


class _RefusedError(Exception):
    """An entry that cannot be unpacked safely; turned into an ApplyError naming it."""


class _Unpacker:
    """Unpacks one layer's entries below ``tree`` and keeps its last boot files in ``boot``."""

    def __init__(self, tree: int, boot: Path, limits: UnpackLimits) -> None:
        self._tree = tree
        self._boot = boot
        self._limits = limits
        self._entries = 0
        self._bytes = 0
        self.kernel = self.initrd = False

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self._entries += 1
        if self._entries > self._limits.max_entries:
            raise _RefusedError(f"is past the limit of {self._limits.max_entries} entries per layer")
        parts = _parts(member.name)
        if not parts:
            if not member.isdir():
                raise _RefusedError("names the layer's root, which is a directory")
            self._own(self._tree, member)
            return
        base = parts[-1]
        if base.startswith(_WHITEOUT):
            self._whiteout(parts[:-1], base)
            return
        parent = self._parent(parts[:-1], create=True)
        try:
            if member.type in _REGULAR or member.issparse():
                self._file(archive, member, parent, base)
            elif member.isdir():
                self._directory(member, parent, base)
            elif member.issym():
                _clear(parent, base)
                os.symlink(member.linkname, base, dir_fd=parent)
                self._own_entry(parent, base, member)
            elif member.islnk():
                self._hard_link(member, parent, base)
            elif member.type in _DEVICES:
                _clear(parent, base)
                kind = _DEVICES[member.type]
                os.mknod(base, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
                self._own_entry(parent, base, member)
                # Not a link: it was just made in the private scratch directory.
                os.chmod(base, member.mode & 0o7777, dir_fd=parent)
            else:
                raise _RefusedError(f"has tar type {member.type!r}, which a layer does not hold")
        finally:
            os.close(parent)

    def _parent(self, parts: Sequence[str], *, create: bool) -> int:
        """A descriptor of the directory ``parts``, no component followed if it is a link;
        missing ones are made (0755, as Docker makes them) when ``create``."""
        fd = os.dup(self._tree)
        for depth, part in enumerate(parts, 1):
            try:
                child = _child(fd, part, "/".join(parts[:depth]), create=create)
            finally:
                os.close(fd)
            fd = child
        return fd

    def _budget(self, member: tarfile.TarInfo) -> None:
        self._bytes += member.size
        if self._bytes > self._limits.max_bytes:
            raise _RefusedError(
                f"declares {member.size} bytes, past the limit of {self._limits.max_bytes} bytes per layer"
            )

    def _file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent: int, base: str) -> None:
        self._budget(member)
        _clear(parent, base)
        kernel, initrd = boot_files_in([(member.name, member.type in (tarfile.REGTYPE, tarfile.AREGTYPE))])
        source = archive.extractfile(member)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(os.fdopen(os.open(base, _NEW_FILE, 0o600, dir_fd=parent), "wb"))
            # Every match rewrites the same scratch file, so the layer's last match wins, as in cocoon.
            boot = _KERNEL if kernel else _INITRD if initrd else None
            copy = None if boot is None else stack.enter_context((self._boot / boot).open("wb"))
            while source is not None and (chunk := source.read(_CHUNK)):
                out.write(chunk)
                if copy is not None:
                    copy.write(chunk)
            out.flush()
            self._own(out.fileno(), member)
        self.kernel = self.kernel or kernel
        self.initrd = self.initrd or initrd

    def _directory(self, member: tarfile.TarInfo, parent: int, base: str) -> None:
        mode = _lstat(parent, base)
        if mode is not None and not stat.S_ISDIR(mode):
            os.unlink(base, dir_fd=parent)
        if mode is None or not stat.S_ISDIR(mode):
            os.mkdir(base, 0o700, dir_fd=parent)
        fd = os.open(base, _DIRECTORY, dir_fd=parent)
        try:
            self._own(fd, member)
        finally:
            os.close(fd)

    def _hard_link(self, member: tarfile.TarInfo, parent: int, base: str) -> None:
        target = _parts(member.linkname, what="its link target")
        if not target:
            raise _RefusedError("is a hard link to the layer's root directory")
        source = self._parent(target[:-1], create=False)
        try:
            mode = _lstat(source, target[-1])
            if mode is None or stat.S_ISDIR(mode):
                raise _RefusedError(
                    f"is a hard link to {member.linkname!r}, which is no earlier file of the layer"
                )
            _clear(parent, base)
            os.link(target[-1], base, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(source)

    def _whiteout(self, parts: Sequence[str], base: str) -> None:
        parent = self._parent(parts, create=True)
        try:
            if base == _OPAQUE:
                os.setxattr(parent, "trusted.overlay.opaque", b"y")
            elif not base.startswith(_WHITEOUT * 2):
                hidden = base.removeprefix(_WHITEOUT)
                if hidden in ("", ".", ".."):
                    raise _RefusedError("is a whiteout of no name")
                _clear(parent, hidden)
                # overlayfs's whiteout: a character device 0:0 of the hidden name.
                os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
        finally:
            os.close(parent)

    def _own(self, fd: int, member: tarfile.TarInfo) -> None:
        # chown before chmod: chown clears set-uid and set-gid bits.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        self._xattrs(fd, member)

    def _own_entry(self, parent: int, base: str, member: tarfile.TarInfo) -> None:
        os.chown(base, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        # No *xattrat call in Python: name the entry through its parent's descriptor, unfollowed.
        self._xattrs(f"/proc/self/fd/{parent}/{base}", member)

    def _xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(_PAX_XATTR):
                continue
            name = key.removeprefix(_PAX_XATTR)
            if name.startswith(_OVERLAY_XATTRS):
                raise _RefusedError(f"carries the extended attribute {name}, which only whiteouts may set")
            data = value.encode("utf-8", "surrogateescape")
            if isinstance(target, int):
                os.setxattr(target, name, data)
            else:
                os.setxattr(target, name, data, follow_symlinks=False)


def _parts(name: str, what: str = "its name") -> list[str]:
    if name.startswith("/"):
        raise _RefusedError(f"has an absolute path as {what} ({name!r})")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _RefusedError(f"has a `..` component in {what} ({name!r})")
    return parts


def _child(parent: int, part: str, path: str, *, create: bool) -> int:
    try:
        return os.open(part, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise _RefusedError(f"needs {path}, which the layer does not hold") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _RefusedError(
                f"lies below {path}, which this layer made a symbolic link or a file; "
                "unpacking never goes through one"
            ) from None
        raise
    os.mkdir(part, 0o755, dir_fd=parent)
    child = os.open(part, _DIRECTORY, dir_fd=parent)
    os.fchmod(child, 0o755)  # whatever the umask: Docker makes missing parents 0755
    return child


def _lstat(parent: int, base: str) -> int | None:
    try:
        return os.stat(base, dir_fd=parent, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def _clear(parent: int, base: str) -> None:
    """Make way for a non-directory ``base``: a later tar entry replaces an earlier one, but a
    directory it would replace is refused rather than removed with everything below it."""
    mode = _lstat(parent, base)
    if mode is None:
        return
    if stat.S_ISDIR(mode):
        raise _RefusedError(f"would replace the directory {base!r} the layer made before")
    os.unlink(base, dir_fd=parent)


def _unpack(blob: Path, digest: str, tree: Path, boot: Path, limits: UnpackLimits) -> _Unpacker:
    fd = os.open(tree, _DIRECTORY)
    unpacker = _Unpacker(fd, boot, limits)
    member: tarfile.TarInfo | None = None
    try:
        with _layer_tar(blob, digest) as archive:
            for member in archive:
                unpacker.add(archive, member)
    except _RefusedError as exc:
        name = "" if member is None else f" entry {member.name!r}"
        raise ApplyError(f"layer {digest}:{name} {exc}", hint=_REFUSED_HINT) from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ApplyError(
            f"layer {digest} is not a readable tar layer: {exc}",
            hint="the blob was verified, so the image itself is broken: rebuild or re-push it",
        ) from exc
    except OSError as exc:
        where = "" if member is None else f" entry {member.name!r}"
        hint = (
            "converting layers needs root (ownership, device nodes, trusted.* attributes), as cocoon does"
            if exc.errno in (errno.EPERM, errno.EACCES)
            else "check the space and permissions under the node root's oci/temp"
        )
        raise ApplyError(
            f"layer {digest}:{where} cannot be unpacked: {exc.strerror or exc}", hint=hint
        ) from exc
    finally:
        os.close(fd)
    return unpacker


# --------------------------------------------------------------------------- conversion


def _mkfs(digest: str, out: Path, tree: Path) -> None:
    binary = shutil.which(MKFS_EROFS)
    if binary is None:
        raise ApplyError(
            f"cannot convert layer {digest}: {MKFS_EROFS} is not installed", hint="install erofs-utils"
        )
    argv = [binary, "--quiet", *MKFS_FLAGS, "-U", erofs_uuid(_hex(digest)), str(out), str(tree)]
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-2000:]
        raise ApplyError(
            f"{MKFS_EROFS} failed on layer {digest} (exit {done.returncode})",
            detail=tail,
            hint="see mkfs.erofs's message; check the space under the node root",
        )


def convert_layer(blob: Path, digest: str, root: Path, limits: UnpackLimits | None = None) -> ConvertedLayer:
    """Install the verified layer ``blob`` named ``digest`` into the node root ``root`` as
    ``cocoon image pull`` does: ``oci/blobs/<hex>.erofs`` and its boot files under
    ``oci/boot/<hex>/``. See the module docstring for the rules; a failure installs nothing."""
    hex_ = _hex(digest)
    scratch_parent = _real_directory(root, TEMP_DIR)
    with tempfile.TemporaryDirectory(prefix=f"cocoonplan-{hex_[:12]}-", dir=scratch_parent) as scratch:
        # The scratch directory is 0700, so the tree below it can take the layer's modes.
        tree, boot = Path(scratch) / "tree", Path(scratch) / "boot"
        tree.mkdir(0o755)
        tree.chmod(0o755)  # the image root's mode when the layer does not give one
        boot.mkdir()
        unpacked = _unpack(blob, digest, tree, boot, limits or UnpackLimits())
        erofs = Path(scratch) / f"{hex_}.erofs"
        _mkfs(digest, erofs, tree)
        for name, found in ((_KERNEL, unpacked.kernel), (_INITRD, unpacked.initrd)):
            if found:
                _publish(root, f"{BOOT_DIR}/{hex_}/{name}", boot / name)
        _publish_erofs(root, f"{BLOBS_DIR}/{hex_}.erofs", erofs)
        size = erofs.stat().st_size
    return ConvertedLayer(
        digest=digest,
        erofs=root / BLOBS_DIR / f"{hex_}.erofs",
        erofs_size=size,
        kernel=unpacked.kernel,
        initrd=unpacked.initrd,
    )


def convert_layers(
    layers: Sequence[LayerBlob], root: Path, limits: UnpackLimits | None = None, workers: int | None = None
) -> tuple[ConvertedLayer, ...]:
    """Convert every distinct layer of ``layers`` at once, at most ``workers`` (default: the
    core count) at a time; results in the order of first appearance.

    Threads suffice: the work is ``mkfs.erofs`` subprocesses, zlib and file I/O, which all
    release the GIL. Every conversion runs to its end; then the first failure is raised.
    Layers converted before it stay installed: each is whole and content-addressed.
    """
    distinct = list({layer.digest: layer for layer in layers}.values())
    if not distinct:
        return ()
    count = min(len(distinct), workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="convert-layer") as pool:
        futures = [pool.submit(convert_layer, layer.path, layer.digest, root, limits) for layer in distinct]
    return tuple(future.result() for future in futures)


# --------------------------------------------------------------------------- images.json


def go_time(moment: datetime) -> str:
    """``moment`` as Go's ``time.Time`` marshals to JSON (RFC 3339, fraction trimmed, ``Z`` for UTC)."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("the clock must return a time with its UTC offset")
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += "." + f"{moment.microsecond:06d}".rstrip("0")
    if not offset:
        return text + "Z"
    zone = moment.strftime("%z")
    return f"{text}{zone[:3]}:{zone[3:5]}"


def go_json(value: Any) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it: UTF-8, ``<>&`` and U+2028/9 escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    # These characters occur only inside strings, so replacing them everywhere is exact.
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def _file_size(root: Path, rel: str, what: str) -> int:
    try:
        info = (root / rel).lstat()
    except FileNotFoundError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise ApplyError(
            f"cannot record the image: {root / rel} ({what}) is not installed",
            hint="convert the image's layers first (convert_layer), then record it",
        )
    return info.st_size


@contextlib.contextmanager
def _images_lock(root: Path) -> Iterator[None]:
    """cocoon's lock on ``images.json``: an exclusive flock on the sibling ``images.lock``."""
    directory = _real_directory(root, str(Path(IMAGES_LOCK).parent))
    path = directory / Path(IMAGES_LOCK).name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ApplyError(f"cannot open {path}: {exc.strerror or exc}", hint="check the node root") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_images(root: Path) -> dict[str, Any]:
    where = root / IMAGES.file
    hint = "cocoon writes this file whole; repair or restore it, then apply again"
    data = read_bounded(root, IMAGES.file, Cap.DATABASE.size)
    if data is None:
        return {IMAGES.records_key: {}}
    if len(data) > Cap.DATABASE.size:
        raise ApplyError(
            f"{where} is larger than {Cap.DATABASE.size} bytes; not {Cap.DATABASE.what}", hint=hint
        )
    try:
        document = loads_written_by_go(data)
    except (ValueError, InputLimitError) as exc:
        raise ApplyError(f"{where} is not cocoon's image index: {exc}", hint=hint) from exc
    images = document.get(IMAGES.records_key) if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(images, dict | None):
        raise ApplyError(f"{where} is not cocoon's image index: no object of images", hint=hint)
    return {**document, IMAGES.records_key: images or {}}


def record_image(
    root: Path,
    key: str,
    manifest_digest: str,
    layers: Sequence[str],
    kernel_layer: str,
    initrd_layer: str,
    *,
    clock: Callable[[], datetime],
) -> ImageRecord:
    """Write the ``images.json`` entry ``key`` of a JSON-engine node root, as cocoon's pull
    commits it (§3.6); other entries and keys are kept as they are. ``layers`` are digests in
    manifest order, bottom first; their EROFS files and the boot files must be installed.

    A SQLite-engine root is refused: cocoonplan never writes ``meta.db``; run
    ``cocoon image pull REF@DIGEST`` there instead.
    """
    for digest in (manifest_digest, *layers, kernel_layer, initrd_layer):
        _hex(digest)
    for which, layer in (("kernel", kernel_layer), ("initrd", initrd_layer)):
        if layer not in layers:
            raise ApplyError(f"cannot record {key}: its {which} layer {layer} is not one of its layers")
    with Tree.open(root, "cocoon root dir", "name the node's cocoon root dir") as tree:
        if detect_engine(meta_files_present(tree)) is MetadataEngine.SQLITE:
            raise ApplyError(
                f"cannot record {key} in {root}: the node keeps its metadata in SQLite (meta/meta.db)",
                hint=f"cocoonplan never writes meta.db: run `cocoon image pull {key}` on the node",
            )
    size = sum(_file_size(root, f"{BLOBS_DIR}/{_hex(d)}.erofs", f"layer {d}") for d in layers)
    size += _file_size(root, f"{BOOT_DIR}/{_hex(kernel_layer)}/{_KERNEL}", "kernel")
    size += _file_size(root, f"{BOOT_DIR}/{_hex(initrd_layer)}/{_INITRD}", "initrd")
    record = ImageRecord(
        ref=key,
        manifest_digest=manifest_digest,
        layers=tuple(ImageLayer(digest=d) for d in layers),
        kernel_layer=kernel_layer,
        initrd_layer=initrd_layer,
        size=size,
        created_at=go_time(clock()),
    )
    with _images_lock(root):
        document = _read_images(root)
        images = {**document[IMAGES.records_key], key: record.model_dump(mode="json")}
        # Go marshals a map with its keys sorted; the file's other keys follow as they were.
        document = {**document, IMAGES.records_key: dict(sorted(images.items()))}
        write_atomic(root, IMAGES.file, go_json(document) + b"\n")
    return record
