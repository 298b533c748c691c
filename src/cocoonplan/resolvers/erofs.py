"""A layer's tree read from its EROFS image on a node, as the guest's overlayfs sees it.

``dump.erofs`` (erofs-utils 1.5, what Debian 12 ships) shows names, types and permission bits,
but neither extended attributes (so not ``trusted.overlay.opaque``), nor device numbers (so not
which character device is overlay's 0:0 whiteout), nor a symbolic link's target. The lookups a
file check needs read those few on-disk structures themselves (``erofs_fs.h``): the
superblock, inodes, uncompressed directory blocks, inline and shared extended attributes and
symbolic-link data. File content is never read (it is compressed), so a file of an EROFS layer
has no sha256 here; the tests compare every answer with ``dump.erofs``.

Whiteouts are what overlayfs honours in a lower layer: a 0:0 character device, and
``trusted.overlay.opaque=y`` on a directory. An OCI ``.wh.`` file left in an image (``mkfs.erofs
--tar`` without ``--aufs`` leaves them) is a plain file to overlayfs, and so it is here.

Every offset and length comes from a hostile file: each is checked against the image's size
before it is read, a directory is read a block at a time up to :data:`MAX_DIRECTORY` bytes,
a lookup reads one inode per path component, and a failure is a ResolveError naming the image.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from cocoonplan.errors import ResolveError
from cocoonplan.resolved import EntryKind, LayerEntry

MAGIC = 0xE0F5E1E2
SUPERBLOCK = 1024
"""Offset of the superblock."""
MAX_DIRECTORY = 64 << 20
"""Bytes of one directory read; a directory of a million entries takes about 30 MiB."""
MAX_LINK = 4096
"""A symbolic link's target, at most PATH_MAX."""
_SLOT = 32
"""Inodes are addressed in 32-byte slots from the metadata block (their NID)."""
_FLAT_PLAIN, _FLAT_INLINE = 0, 2
_DIRENT = 12
_TRUSTED = 4
"""``EROFS_XATTR_INDEX_TRUSTED``: the ``trusted.`` name prefix."""


@dataclass(frozen=True)
class _Inode:
    offset: int
    """Where the inode starts in the image."""
    mode: int
    size: int
    layout: int
    data: int
    """``i_u``: the first data block, or a device's number."""
    xattrs: int
    """Bytes of the inline extended-attribute area after the inode."""
    inline: int
    """Where inline (tail-packed) data starts."""


class ErofsImage:
    """Lookups in one EROFS image, opened by the caller (never through a link)."""

    def __init__(self, file: BinaryIO, what: str) -> None:
        self._fd = file.fileno()
        self._what = what
        self._size = os.fstat(self._fd).st_size
        sb = self._read(SUPERBLOCK, 128)
        if struct.unpack_from("<I", sb, 0)[0] != MAGIC:
            self._fail("is not an EROFS image (no EROFS superblock)")
        bits = sb[12]
        if not 9 <= bits <= 16:
            self._fail(f"has a block size of 2^{bits} bytes, which EROFS does not use")
        self._block = 1 << bits
        self._root = struct.unpack_from("<H", sb, 14)[0]
        self._meta = struct.unpack_from("<I", sb, 40)[0] * self._block
        self._xattr_base = struct.unpack_from("<I", sb, 44)[0] * self._block
        self._nids: dict[str, int | None] = {"/": self._root}
        self._directories: dict[int, dict[bytes, int]] = {}

    def _fail(self, problem: str) -> NoReturn:
        raise ResolveError(
            f"{self._what} {problem}", hint="the node's EROFS layer is damaged: pull the image again"
        )

    def _read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            self._fail(
                f"is cut short: {length} bytes at offset {offset} lie past its end ({self._size} bytes)"
            )
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            self._fail(f"could not be read at offset {offset}")
        return data

    def _inode(self, nid: int) -> _Inode:
        offset = self._meta + nid * _SLOT
        head = self._read(offset, _SLOT)
        form, icount, mode = struct.unpack_from("<HHH", head, 0)
        extended = form & 1
        size = (
            struct.unpack_from("<Q", self._read(offset, 64), 8)[0]
            if extended
            else struct.unpack_from("<I", head, 8)[0]
        )
        xattrs = 12 + 4 * (icount - 1) if icount else 0
        return _Inode(
            offset=offset,
            mode=mode,
            size=size,
            layout=(form >> 1) & 7,
            data=struct.unpack_from("<I", head, 16)[0],
            xattrs=xattrs,
            inline=offset + (64 if extended else 32) + xattrs,
        )

    def _data(self, inode: _Inode, start: int, length: int) -> bytes:
        """Bytes ``start..start+length`` of an uncompressed inode, within one block."""
        block = start // self._block
        if inode.layout == _FLAT_INLINE and block == (inode.size - 1) // self._block:
            return self._read(inode.inline + start % self._block, length)  # the tail, packed after the inode
        if inode.layout in (_FLAT_PLAIN, _FLAT_INLINE):
            return self._read(inode.data * self._block + start, length)
        self._fail(f"stores an inode (at {inode.offset}) in layout {inode.layout}, which is not read here")

    def _children(self, nid: int, inode: _Inode) -> dict[bytes, int]:
        if nid in self._directories:
            return self._directories[nid]
        if inode.size > MAX_DIRECTORY:
            self._fail(f"holds a directory of {inode.size} bytes, more than {MAX_DIRECTORY} are read")
        found: dict[bytes, int] = {}
        for start in range(0, inode.size, self._block):
            block = self._data(inode, start, min(self._block, inode.size - start))
            first = struct.unpack_from("<H", block, 8)[0] if len(block) >= _DIRENT else 0
            if first < _DIRENT or first > len(block) or first % _DIRENT:
                self._fail(f"holds a malformed directory block at inode {inode.offset}")
            count = first // _DIRENT
            for index in range(count):
                child, nameoff = struct.unpack_from("<QH", block, index * _DIRENT)
                end = (
                    struct.unpack_from("<H", block, (index + 1) * _DIRENT + 8)[0]
                    if index + 1 < count
                    else len(block)
                )
                if not first <= nameoff <= end <= len(block):
                    self._fail(f"holds a malformed directory entry at inode {inode.offset}")
                found[block[nameoff:end].split(b"\0", 1)[0]] = child
        self._directories[nid] = found
        return found

    def _nid(self, path: str) -> int | None:
        """The inode number at ``path``, walking down from the nearest one already found."""
        missing = []
        while path not in self._nids:
            missing.append(path)
            path = path.rpartition("/")[0] or "/"
        nid = self._nids[path]
        for path in reversed(missing):
            if nid is not None:
                inode = self._inode(nid)
                names = self._children(nid, inode) if stat.S_ISDIR(inode.mode) else {}
                nid = names.get(path.rpartition("/")[2].encode("utf-8", "surrogateescape"))
            self._nids[path] = nid
        return nid

    def _opaque(self, inode: _Inode) -> bool:
        if not inode.xattrs:
            return False
        body = self._read(inode.inline - inode.xattrs, inode.xattrs)
        shared = body[4]
        if 12 + 4 * shared > len(body):
            self._fail(f"lists more shared attributes than its inode at {inode.offset} has room for")
        entries = [
            self._xattr_at(self._xattr_base + 4 * struct.unpack_from("<I", body, 12 + 4 * i)[0])
            for i in range(shared)
        ]
        offset = 12 + 4 * shared
        while offset + 4 <= len(body):
            name_len, index, value_len = struct.unpack_from("<BBH", body, offset)
            end = offset + 4 + name_len + value_len
            if end > len(body):
                self._fail(f"holds a malformed extended attribute at inode {inode.offset}")
            entries.append(
                (index, body[offset + 4 : offset + 4 + name_len], body[offset + 4 + name_len : end])
            )
            offset = (end + 3) & ~3
        return (_TRUSTED, b"overlay.opaque", b"y") in entries

    def _xattr_at(self, offset: int) -> tuple[int, bytes, bytes]:
        name_len, index, value_len = struct.unpack_from("<BBH", self._read(offset, 4))
        data = self._read(offset + 4, name_len + value_len)
        return index, data[:name_len], data[name_len:]

    def entry(self, path: str) -> LayerEntry | None:
        """The image's own entry at the absolute ``path``; None when it holds nothing there."""
        nid = self._nid(path)
        if nid is None:
            return None
        inode = self._inode(nid)
        mode = inode.mode & 0o7777
        if stat.S_ISDIR(inode.mode):
            return LayerEntry(kind=EntryKind.DIRECTORY, mode=mode, opaque=self._opaque(inode))
        if stat.S_ISREG(inode.mode):
            return LayerEntry(kind=EntryKind.FILE, mode=mode)
        if stat.S_ISLNK(inode.mode):
            if inode.size > min(MAX_LINK, self._block):
                self._fail(f"holds a symbolic link of {inode.size} bytes at {path}")
            target = self._data(inode, 0, inode.size).decode("utf-8", "surrogateescape")
            return LayerEntry(kind=EntryKind.SYMLINK, mode=mode, target=target)
        if stat.S_ISCHR(inode.mode) and inode.data == 0:
            return LayerEntry(kind=EntryKind.WHITEOUT)
        return LayerEntry(kind=EntryKind.OTHER, mode=mode)
