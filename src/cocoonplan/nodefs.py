"""The one way cocoonplan reads file systems it does not trust: a node's cocoon root (a copy, or
``state: node`` in a repository any pull request can change), a copy of a node's CNI conf dir,
and an exported state document.

What is read from them lands in exported state and in pull-request comments, so no read may
reach outside the tree it was asked about, block, or exhaust memory:

- A path below the tree is walked one component at a time from the tree's open directory,
  each directory opened with ``O_DIRECTORY | O_NOFOLLOW``: a symbolic link anywhere on the way
  (``run/cloudhypervisor`` itself, a VM's run dir, the file) is refused, never followed.
  Absolute paths and ``..`` are refused before the walk, so no path can name anything outside.
- Only regular files are opened. The entry is lstat-ed first, so a FIFO or device is never
  opened; then it is opened with ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` and fstat-ed, so an
  entry swapped for one between the two neither blocks nor is read.
- Every read is capped by the kind of file (:class:`Cap`), every listing by the kind of
  directory (:class:`Listing`).
- A violation is a one-line :class:`StateError` naming the path as the tree names it (relative
  to a node root; under the given path otherwise), with the tree's hint.

The tree's own directory is opened as the caller names it: a link there is the user's choice
(``/var/lib/cocoon`` on another disk, say). Everything below it is confined.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NoReturn

from cocoonplan.errors import StateError


class Cap(Enum):
    """The most bytes read of each kind of file: far above any real one, far below a risk to memory."""

    CMDLINE = (64 << 10, "a run dir's cmdline")
    """One launch line; real ones are a few KiB."""
    CONFLIST = (1 << 20, "a CNI conflist")
    """Real conflists are a few hundred bytes."""
    RUN_FILE = (4 << 20, "a run dir's config.json or cocoon.json")
    """A VmConfig or snapshot sidecar; a few KiB, one entry per disk and NIC."""
    OWNERSHIP = (16 << 20, "cocoonplan's ownership file")
    """One entry (a few KiB with its launch line) per VM cocoonplan created."""
    DATABASE = (64 << 20, "a cocoon database")
    """vms.json, images.json, snapshots.json: a few KiB per record."""
    STATE_DOCUMENT = (256 << 20, "an exported state document")
    """Everything above for one node, pretty-printed."""

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what


class Listing(Enum):
    """The most entries listed of each kind of directory."""

    CONF_DIR = (4096, "a CNI conf dir")
    """A node's holds a handful."""
    NODE_DIR = (1 << 16, "a directory of a cocoon root")
    """``oci/blobs`` holds one entry per layer on the node, ``oci/boot`` one per boot layer."""

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in after the lstat must not wait for a writer;
# O_NOCTTY: a terminal swapped in must not become the process's controlling terminal.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def describe(mode: int) -> str:
    """What a file of this ``st_mode`` is, for messages: ``a symbolic link``, ``a FIFO``…"""
    return next((text for test, text in _KINDS if test(mode)), "of an unknown file type")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Tree:
    """A directory opened once (:meth:`open`); every path read below it stays below it."""

    def __init__(self, fd: int, label: Path | None, hint: str) -> None:
        self._fd = fd
        self._label = label
        self._hint = hint

    @classmethod
    @contextmanager
    def open(cls, path: Path, what: str, hint: str, *, label: Path | None = None) -> Iterator[Tree]:
        """The directory ``path`` as a tree, closed on exit.

        ``what`` names the directory in errors (``CNI conf dir``); ``hint`` is every error's
        hint. Paths below are named relative to the tree, or under ``label`` when given.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StateError(f"{path}: {what} does not exist", hint=hint) from None
        except NotADirectoryError:
            raise StateError(f"{path}: is not a directory; a {what} is one", hint=hint) from None
        except OSError as exc:
            raise StateError(f"{path}: cannot be read: {_reason(exc)}", hint=hint) from None
        try:
            yield cls(fd, label, hint)
        finally:
            os.close(fd)

    def where(self, rel: str) -> str:
        """How errors name ``rel``: relative to the tree, or under its label."""
        return rel if self._label is None else str(self._label / rel)

    def read(self, rel: str, cap: Cap) -> bytes | None:
        """The bytes of the regular file ``rel``; None when it (or a directory on the way) is absent.

        A link, directory or special file, a file over ``cap`` and an unreadable file are errors.
        """
        with self.open_file(rel) as file:
            return None if file is None else self._read_capped(file, self._parts(rel), cap)

    @contextmanager
    def open_file(self, rel: str) -> Iterator[BinaryIO | None]:
        """The regular file ``rel`` open for reading, closed on exit; None when it (or a
        directory on the way) is absent. The caller bounds what it reads.

        A link, directory or special file, and a file that cannot be opened, are errors.
        """
        parts = self._parts(rel)
        with self._directory(parts[:-1]) as parent:
            mode = None if parent is None else self._lstat(parent, parts)
            if parent is None or mode is None:
                yield None
                return
            self._require_file(parts, mode)
            try:
                fd = os.open(parts[-1], _FILE, dir_fd=parent)
            except OSError as exc:
                self._fail(parts, f"cannot be read: {_reason(exc)}")
        with os.fdopen(fd, "rb") as file:
            self._require_file(parts, os.fstat(file.fileno()).st_mode)
            yield file

    def mode(self, rel: str) -> int | None:
        """The ``st_mode`` of ``rel`` itself (a link is not followed); None when absent."""
        parts = self._parts(rel)
        with self._directory(parts[:-1]) as parent:
            return None if parent is None else self._lstat(parent, parts)

    def has_file(self, rel: str) -> bool:
        """Whether the regular file ``rel`` exists; anything else there is an error."""
        mode = self.mode(rel)
        if mode is not None:
            self._require_file(self._parts(rel), mode)
        return mode is not None

    def entries(self, rel: str, listing: Listing) -> dict[str, int] | None:
        """The names of the directory ``rel``'s entries (``.`` the tree's own) with their
        ``st_mode`` (links not followed), in no order; None when it is absent."""
        parts = self._parts(rel, directory=True)
        with self._directory(parts) as directory:
            if directory is None:
                return None
            found: dict[str, int] = {}
            try:
                with os.scandir(directory) as scan:
                    for entry in scan:
                        if len(found) == listing.size:
                            self._fail(parts, f"holds more than {listing.size} entries; not {listing.what}")
                        found[entry.name] = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                self._fail(parts, f"cannot be listed: {_reason(exc)}")
            return found

    # ------------------------------------------------------------------ the walk

    def _fail(self, parts: tuple[str, ...], problem: str) -> NoReturn:
        raise StateError(f"{self.where('/'.join(parts) or '.')}: {problem}", hint=self._hint)

    def _parts(self, rel: str, *, directory: bool = False) -> tuple[str, ...]:
        """The components of ``rel``; only a directory may be the tree itself (``.``)."""
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts:
            self._fail((rel,), "is not a path inside the directory read; cocoonplan reads nothing outside it")
        if not path.parts and not directory:
            self._fail(path.parts, "is a directory, not a regular file")
        return path.parts

    @contextmanager
    def _directory(self, parts: tuple[str, ...]) -> Iterator[int | None]:
        """The directory ``parts`` names, each component opened without following a link;
        None when one of them is absent."""
        with ExitStack() as opened:
            fd = self._fd
            for depth in range(1, len(parts) + 1):
                child = self._open_directory(fd, parts[:depth])
                if child is None:
                    yield None
                    return
                fd = child
                opened.callback(os.close, fd)
            yield fd

    def _open_directory(self, parent: int, parts: tuple[str, ...]) -> int | None:
        try:
            return os.open(parts[-1], _DIRECTORY, dir_fd=parent)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # O_NOFOLLOW and O_DIRECTORY fail alike for a link and a file: say which it is.
            mode = self._lstat(parent, parts)
            if mode is not None and not stat.S_ISDIR(mode):
                self._fail(
                    parts, f"is {describe(mode)}, not a directory; cocoonplan does not follow or open it"
                )
            self._fail(parts, f"cannot be read: {_reason(exc)}")

    def _lstat(self, parent: int, parts: tuple[str, ...]) -> int | None:
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail(parts, f"cannot be read: {_reason(exc)}")

    def _require_file(self, parts: tuple[str, ...], mode: int) -> None:
        if not stat.S_ISREG(mode):
            self._fail(
                parts, f"is {describe(mode)}, not a regular file; cocoonplan does not follow or open it"
            )

    def _read_capped(self, file: BinaryIO, parts: tuple[str, ...], cap: Cap) -> bytes:
        info = os.fstat(file.fileno())
        self._require_file(parts, info.st_mode)
        too_large = f"is larger than {cap.size} bytes, the most cocoonplan reads of {cap.what}"
        if info.st_size > cap.size:
            self._fail(parts, too_large)
        try:
            data = file.read(cap.size + 1)
        except OSError as exc:
            self._fail(parts, f"cannot be read: {_reason(exc)}")
        if len(data) > cap.size:
            self._fail(parts, too_large)
        return data
