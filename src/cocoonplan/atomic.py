"""Every file cocoonplan writes, written one way: whole or not at all, and never through a link.

A pull request can plant symbolic links where cocoonplan writes (a ``plan.json.tmp`` beside
``--out plan.json``, a ``node-a`` link in a render directory, a ``blobs`` link in a
repository-relative cache); writing through one would overwrite its target outside the
directory. So every write (``render``, ``plan --out``, ``lock``, ``schemas``, the cache):

* takes the directory the user or the project names as named (its parents are resolved as
  the OS resolves them), but that directory must itself be a real directory, not a link; it is
  created when missing;
* opens every component below it that cocoonplan names itself (render's ``<node>/<vm>``, the
  cache's ``blobs/sha256``) relative to its parent's descriptor with ``O_DIRECTORY|O_NOFOLLOW``,
  creating it with ``mkdirat`` when missing, so a link there is refused, never followed;
* refuses a target that exists and is not a regular file, with an error naming it. The rename
  would replace a link itself, not its target, so following is not the risk; but a link where
  cocoonplan writes was put there by someone else, and saying so beats silently dropping it;
* writes to a temporary file created exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``, a random name)
  in the target's directory, fsyncs it, renames it over the target with ``os.replace``
  relative to the directory's descriptor, then fsyncs the directory: a crash leaves the old
  file or the new one, never a mix; on any failure the temporary file is removed.

Files cocoonplan reads back from where it wrote them (rendered files, cache entries), and every
file it reads from a repository (specs, the project file, the lock, an OCI layout's index and
blobs), are read through the same walk (:func:`open_regular`, :func:`read_bounded`): a link
anywhere below the named directory, a FIFO or a device is refused, never followed, opened or
waited on, and a read stops a byte past its limit. A pull request can commit a link to
``/dev/stdin`` or to a FIFO as easily as a file.
Every failure is a :class:`CocoonplanError` naming the path, with a hint (a read's is a
:class:`ReadError`, which a reader can name the file in its own way); nothing raises a
bare ``OSError``.

:func:`check_directory` raises what writing into a directory would meet, so a command can
refuse a bad output directory before it plans and prints anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from cocoonplan.errors import CocoonplanError
from cocoonplan.nodefs import describe

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMPORARY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a file's name must not wait for a writer.
# O_NOCTTY: a terminal swapped in after the lstat must not become the controlling terminal.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1 << 20

_HINTS = {
    errno.EACCES: "make the directory writable for this user, or choose another one",
    errno.EPERM: "make the directory writable for this user, or choose another one",
    errno.EROFS: "the file system is mounted read-only; choose a directory on a writable one",
    errno.ENOSPC: "free space on that file system, then run the command again",
    errno.EDQUOT: "free space within your quota, then run the command again",
    errno.ENOTDIR: "a component of the path is a file, not a directory; choose another path",
    errno.EEXIST: "a file of that name is in the way of the directory; remove it or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


_READ_HINTS = {
    errno.EACCES: "make it readable for this user (and its directories searchable)",
    errno.EPERM: "make it readable for this user (and its directories searchable)",
}
READ_REFUSED_HINT = (
    "cocoonplan reads only regular files and never follows a link: put the file itself there, or remove it"
)


class ReadError(CocoonplanError):
    """A file could not be read as a regular file: it is a link, directory, FIFO or device, a
    directory on its way is, or the OS refused. :attr:`reason` says why without naming the file
    and :meth:`about` says it naming the file another way, so each reader names it as its users
    know it (a spec by its project path, a layout blob by its digest)."""

    def __init__(self, path: Path, reason: str, *, hint: str, refused: bool, itself: bool = True) -> None:
        self.path = path
        self.reason = reason
        self._refused = refused
        self._itself = itself
        super().__init__(self.about(str(path)), hint=hint)

    def about(self, name: str) -> str:
        """The message naming the file ``name`` (an error of a directory on the way names that)."""
        name = name if self._itself else str(self.path)
        return f"{name} {self.reason}" if self._refused else f"cannot read {name}: {self.reason}"


def _failure(action: str, path: Path, exc: OSError, *, itself: bool = True) -> CocoonplanError:
    reason = exc.strerror or str(exc)
    if action == "read":
        hint = _READ_HINTS.get(exc.errno or 0) or _HINTS.get(
            exc.errno or 0, "check the path and its permissions"
        )
        return ReadError(path, reason, hint=hint, refused=False, itself=itself)
    return CocoonplanError(
        f"cannot {action} {path}: {reason}",
        hint=_HINTS.get(exc.errno or 0, "check the path and its permissions"),
    )


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a directory" if stat.S_ISDIR(mode) else "a special file"


def _not_a_file(path: Path, kind: str) -> CocoonplanError:
    return CocoonplanError(
        f"{path} is {kind}, not a regular file; cocoonplan never writes or reads through it",
        hint="cocoonplan did not put it there: remove or rename it, then run the command again",
    )


def _refusal(action: str, path: Path, exc: OSError) -> CocoonplanError:
    """The error for a directory that could not be opened: a link is named as such."""
    if path.is_symlink():
        reason = "is a symbolic link, not a directory; cocoonplan never writes or reads through links"
        hint = "replace the link with a real directory, or name the directory it points to"
        if action == "read":
            return ReadError(path, reason, hint=hint, refused=True, itself=False)
        return CocoonplanError(f"{path} {reason}", hint=hint)
    return _failure(action, path, exc, itself=False)


def _parts(directory: Path, name: str) -> list[str]:
    parts = name.split("/")
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise CocoonplanError(
            f"cannot write {name!r} under {directory}: not a plain file name",
            hint="give a path that names a file, without `..` components",
        )
    return parts


def _open_root(directory: Path, create: bool) -> int:
    try:
        return os.open(directory, _DIRECTORY)
    except FileNotFoundError:
        if not create:
            raise
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory, _DIRECTORY)


def _open_child(parent: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    # Made by a concurrent writer in between: it is opened below, without following, like any other.
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o777, dir_fd=parent)
    return os.open(name, _DIRECTORY, dir_fd=parent)


def _walk(directory: Path, parts: Sequence[str], *, create: bool) -> int:
    """A descriptor of ``directory/parts...``; components below ``directory`` are never links.

    Without ``create``, a missing component raises FileNotFoundError (absent is an answer to a
    reader); every other failure is a CocoonplanError naming the component.
    """
    path = directory
    try:
        fd = _open_root(directory, create)
        for part in parts:
            path = path / part
            try:
                child = _open_child(fd, part, create)
            finally:
                os.close(fd)
            fd = child
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not create:
            raise
        raise _refusal("write into" if create else "read", path, exc) from exc
    return fd


def _check_target(dir_fd: int, name: str, path: Path) -> None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _failure("inspect", path, exc) from exc
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_file(path, _kind(info.st_mode))


def check_target(directory: Path, name: str) -> None:
    """Raise the error a write of ``name`` under ``directory`` would meet on a link or special
    file on its way, so a command can refuse before it changes anything; absent is fine."""
    parts = _parts(directory, name)
    try:
        dir_fd = _walk(directory, parts[:-1], create=False)
    except FileNotFoundError:
        return
    try:
        _check_target(dir_fd, parts[-1], directory.joinpath(*parts))
    finally:
        os.close(dir_fd)


def check_directory(directory: Path, *, writable: bool = True) -> None:
    """Raise the error using ``directory`` as an output directory would meet, so a command can
    refuse it before it plans or prints anything: a link or a file where the directory belongs,
    a path under a file, and (``writable``) a directory, or the nearest existing parent of a
    missing one, that this user cannot create files in (probed by creating one exclusively and
    removing it). Nothing is left behind; a missing directory is not created."""
    try:
        fd = _walk(directory, (), create=False)
        where = directory
    except FileNotFoundError:
        if not writable:
            return
        where = next((p for p in directory.parents if os.path.lexists(p)), Path("/"))
        try:
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _failure("write into", directory, exc) from exc
    try:
        if writable:
            temporary = f".cocoonplan-probe.{secrets.token_hex(8)}.tmp"
            try:
                os.close(os.open(temporary, _TEMPORARY, 0o600, dir_fd=fd))
            except OSError as exc:
                raise _failure("write into", where, exc) from exc
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=fd)
    finally:
        os.close(fd)


class AtomicFile:
    """What :func:`atomic_writer` yields: bytes written go to the temporary file."""

    def __init__(self, out: BinaryIO, path: Path) -> None:
        self._out = out
        self._path = path

    def write(self, data: bytes) -> None:
        """Append ``data``; a full disk or I/O error is a CocoonplanError naming the target."""
        try:
            self._out.write(data)
        except OSError as exc:
            raise _failure("write", self._path, exc) from exc


def _create_temporary(dir_fd: int, name: str, path: Path) -> tuple[int, str]:
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        return os.open(temporary, _TEMPORARY, 0o666, dir_fd=dir_fd), temporary
    except OSError as exc:
        raise _failure("write", path, exc) from exc


def _publish(dir_fd: int, temporary: str, name: str, path: Path) -> None:
    try:
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        # The rename is durable only once the directory entry is.
        os.fsync(dir_fd)
    except OSError as exc:
        raise _failure("write", path, exc) from exc


@contextlib.contextmanager
def atomic_writer(directory: Path, name: str) -> Iterator[AtomicFile]:
    """Write ``directory/name`` (``name`` may hold ``/``): what the ``with`` body writes replaces
    the file when the body succeeds; when it raises, the file is untouched and the temporary
    file removed. See the module docstring for the rules."""
    parts = _parts(directory, name)
    path = directory.joinpath(*parts)
    dir_fd = _walk(directory, parts[:-1], create=True)
    try:
        _check_target(dir_fd, parts[-1], path)
        fd, temporary = _create_temporary(dir_fd, parts[-1], path)
        try:
            with os.fdopen(fd, "wb") as out:
                yield AtomicFile(out, path)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise _failure("write", path, exc) from exc
            _publish(dir_fd, temporary, parts[-1], path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


class NotLinkableError(CocoonplanError):
    """The file system refuses a hard link there (another file system, protected hard links)."""


@contextlib.contextmanager
def link_writer(source_fd: int, directory: Path, name: str) -> Iterator[None]:
    """Place the open file ``source_fd`` at ``directory/name`` as another hard link to it, the
    way :func:`atomic_writer` places a file: under a temporary name until the ``with`` body
    succeeds (a caller verifies the bytes there), then renamed over the target and the
    directory fsync'd; removed when the body raises. No byte is copied.

    Linked through ``/proc/self/fd``, the descriptor opened without following links, never
    through a path a link could replace in between. NotLinkableError, before the body, when
    the file system refuses: the caller copies instead.
    """
    parts = _parts(directory, name)
    path = directory.joinpath(*parts)
    dir_fd = _walk(directory, parts[:-1], create=True)
    try:
        _check_target(dir_fd, parts[-1], path)
        temporary = f".{parts[-1]}.{secrets.token_hex(8)}.tmp"
        try:
            os.link(f"/proc/self/fd/{source_fd}", temporary, dst_dir_fd=dir_fd, follow_symlinks=True)
        except OSError as exc:
            raise NotLinkableError(f"cannot link {path}: {exc.strerror or exc}") from exc
        try:
            yield
            _publish(dir_fd, temporary, parts[-1], path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(directory: Path, name: str, data: bytes | str) -> None:
    """Replace ``directory/name`` with ``data`` (str as UTF-8), atomically and never through a link."""
    with atomic_writer(directory, name) as out:
        out.write(data.encode() if isinstance(data, str) else data)


def open_regular(directory: Path, name: str) -> BinaryIO | None:
    """Open ``directory/name`` for reading, walking as a write does; None when it is absent.

    A link, FIFO or device is a CocoonplanError naming it: it is not a file cocoonplan wrote.
    """
    parts = _parts(directory, name)
    path = directory.joinpath(*parts)
    try:
        dir_fd = _walk(directory, parts[:-1], create=False)
    except FileNotFoundError:
        return None
    try:
        # lstat first: a FIFO or device is never opened (opening some has effects of its own).
        mode = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise _not_read(path, mode)
        fd = os.open(parts[-1], _READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_read(path, stat.S_IFLNK) from exc
        raise _failure("read", path, exc) from exc
    finally:
        os.close(dir_fd)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped in between
        os.close(fd)
        raise _not_read(path, mode)
    return os.fdopen(fd, "rb")


def _not_read(path: Path, mode: int) -> ReadError:
    reason = f"is {describe(mode)}, not a regular file; cocoonplan never writes or reads through it"
    return ReadError(path, reason, hint=READ_REFUSED_HINT, refused=True)


def read_bounded(directory: Path, name: str, limit: int | None) -> bytes | None:
    """``directory/name`` read as :func:`open_regular` opens it, None when absent; at most
    ``limit + 1`` bytes, so a caller can tell a file longer than ``limit``. Read a chunk at a
    time: a small file costs its size, not the limit."""
    source = open_regular(directory, name)
    if source is None:
        return None
    with source:
        try:
            if limit is None:
                return source.read()
            chunks: list[bytes] = []
            left = limit + 1
            while left and (chunk := source.read(min(left, _CHUNK))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise _failure("read", directory / name, exc) from exc


def holds(directory: Path, name: str, data: bytes | str) -> bool:
    """Whether ``directory/name`` is a regular file holding exactly ``data`` (str as UTF-8)."""
    content = data.encode() if isinstance(data, str) else data
    return read_bounded(directory, name, len(content)) == content


def update_file(directory: Path, name: str, data: bytes | str) -> bool:
    """Write ``data`` to ``directory/name`` unless the file holds exactly that; True when written."""
    if holds(directory, name, data):
        return False
    write_atomic(directory, name, data)
    return True


def remove_file(directory: Path, name: str) -> None:
    """Remove ``directory/name``, walking as a write does (a link on the way is refused; a link
    as ``name`` is removed itself); absent is fine."""
    parts = _parts(directory, name)
    path = directory.joinpath(*parts)
    try:
        dir_fd = _walk(directory, parts[:-1], create=False)
    except FileNotFoundError:
        return
    try:
        os.unlink(parts[-1], dir_fd=dir_fd)
        os.fsync(dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _failure("remove", path, exc) from exc
    finally:
        os.close(dir_fd)


def create_exclusive(directory: Path, name: str, data: bytes | str) -> bool:
    """Create ``directory/name`` holding ``data`` only if nothing has that name; False when
    something does. Written and synced under a temporary name, then hard-linked into place,
    so the name never holds a partial file and two writers cannot both win."""
    parts = _parts(directory, name)
    path = directory.joinpath(*parts)
    dir_fd = _walk(directory, parts[:-1], create=True)
    try:
        fd, temporary = _create_temporary(dir_fd, parts[-1], path)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data.encode() if isinstance(data, str) else data)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temporary, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                return False
            os.fsync(dir_fd)
            return True
        except OSError as exc:
            raise _failure("write", path, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
