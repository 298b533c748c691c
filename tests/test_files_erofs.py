"""Layers read from their EROFS conversion on a node, as the guest's overlayfs reads them.

The layers of ``filelayers`` are converted by the product's converter (as apply installs them)
with the real mkfs.erofs; the reader's answers are compared with the tar they came from, with
``dump.erofs`` (erofs-utils 1.5), and with the kernel: the images mounted and stacked with
overlayfs as cocoon's guest stacks them. Damaged images give a ResolveError, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoonplan.errors import ResolveError, StateError
from cocoonplan.executors.layers import convert_layer
from cocoonplan.nodefs import Tree
from cocoonplan.planner.files import Hit, Miss, locate
from cocoonplan.resolved import EntryKind, LayerEntry
from cocoonplan.resolvers.erofs import ErofsImage
from cocoonplan.resolvers.layerscan import scan_layer
from filelayers import LAYERS, PATHS
from needs import unavailable
from ocifixture import Blob, directory, layer_of, opaque, regular

pytestmark = pytest.mark.usefixtures("erofs_as_root")


def _convert(root: Path, blob: Blob) -> Path:
    source = root.parent / f"{root.name}-in" / blob.hex
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(blob.data)
    return convert_layer(source, blob.digest, root).erofs


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files") / "node"
    for blob in LAYERS:
        _convert(root, blob)
    return root


@contextlib.contextmanager
def _images(node: Path) -> Iterator[dict[str, ErofsImage]]:
    with contextlib.ExitStack() as opened:
        tree = opened.enter_context(Tree.open(node, "cocoon root dir", "test"))
        images = {}
        for blob in LAYERS:
            file = opened.enter_context(tree.open_file(f"oci/blobs/{blob.hex}.erofs"))
            assert file is not None
            images[blob.digest] = ErofsImage(file, blob.digest)
        yield images


def _dump(*args: str) -> str:
    done = subprocess.run(["dump.erofs", *args], capture_output=True, text=True, check=True)
    return done.stdout if "<E>" not in done.stderr else ""


def test_every_entry_reads_as_the_tar_it_was_converted_from(node: Path) -> None:
    with _images(node) as images:
        for blob in LAYERS:
            tree = scan_layer(io.BytesIO(blob.data), blob.digest, keep=True).entries
            assert tree is not None
            for path, entry in tree.items():
                assert images[blob.digest].entry(path) == entry.entry(), (blob.digest, path)


_TYPES = {"regular file": EntryKind.FILE, "directory": EntryKind.DIRECTORY, "symlink file": EntryKind.SYMLINK}


def test_every_answer_agrees_with_dump_erofs(node: Path) -> None:
    with _images(node) as images:
        for blob in LAYERS:
            image = node / "oci/blobs" / f"{blob.hex}.erofs"
            tree = scan_layer(io.BytesIO(blob.data), blob.digest, keep=True).entries
            assert tree is not None
            for path in sorted({*tree, *PATHS}):
                shown = _dump(f"--path={path}", str(image))
                entry = images[blob.digest].entry(path)
                if not shown:
                    assert entry is None, path
                    continue
                assert entry is not None, path
                kind = re.search(r"On-disk size: \d+\s+(.+)$", shown, re.M)
                access = re.search(r"Access: (\d+)/", shown)
                assert kind is not None and access is not None
                if kind[1] == "char dev":
                    assert entry.kind is EntryKind.WHITEOUT
                    continue
                # dump.erofs 1.5 shows the permission bits without set-id bits.
                assert (_TYPES[kind[1]], int(access[1], 8)) == (entry.kind, entry.mode & 0o777), path
                if entry.kind is EntryKind.DIRECTORY:
                    listed = re.findall(
                        r"^\s+\d+\s+\d+\s+(\S+)$", _dump("--ls", f"--path={path}", str(image)), re.M
                    )
                    children = {
                        p.rsplit("/", 1)[1]
                        for p in tree
                        if p != "/" and p.rpartition("/")[0] == path.rstrip("/")
                    }
                    assert set(listed) - {".", ".."} == children, path


@contextlib.contextmanager
def _overlay(node: Path, where: Path) -> Iterator[Path]:
    """The layers mounted and stacked, top first, as cocoon-overlay stacks them (read-only)."""
    mounted: list[Path] = []
    try:
        for index, blob in enumerate(LAYERS):
            target = where / f"layer{index}"
            target.mkdir()
            image = node / "oci/blobs" / f"{blob.hex}.erofs"
            if subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(target)]).returncode:
                unavailable("a loop mount of an EROFS image (root, the erofs module)")
            mounted.append(target)
        merged = where / "merged"
        merged.mkdir()
        lower = ":".join(str(m) for m in reversed(mounted))
        if subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(merged)]
        ).returncode:
            unavailable("an overlayfs mount (root, the overlay module)")
        mounted.append(merged)
        yield merged
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", str(target)], check=True)


def _answer(path: str, follow: bool) -> list[Any] | None:
    try:
        info = os.stat(path) if follow else os.lstat(path)  # noqa: PTH116 - in the chroot, a str path is what it names
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    if stat.S_ISDIR(info.st_mode):
        return ["directory", stat.S_IMODE(info.st_mode), None]
    if stat.S_ISLNK(info.st_mode):
        return ["symlink", stat.S_IMODE(info.st_mode), None]
    with open(path, "rb") as file:  # noqa: PTH123
        return ["file", stat.S_IMODE(info.st_mode), hashlib.sha256(file.read()).hexdigest()]


def _kernel(merged: Path) -> dict[str, Any]:
    """What the kernel resolves each of PATHS to (stat and lstat), looked up inside ``merged``
    as its root, so that an absolute link resolves in the guest's tree, not this machine's."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(read)
            os.chroot(merged)
            os.chdir("/")
            answers = {
                f"{path} {follow}": _answer(path, follow) for path in PATHS for follow in (True, False)
            }
            os.write(write, json.dumps(answers).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    answers: dict[str, Any] = json.loads(data)
    return answers


def test_the_offline_merge_is_what_the_kernels_overlay_shows(node: Path, tmp_path: Path) -> None:
    trees = {
        blob.digest: scan_layer(io.BytesIO(blob.data), blob.digest, keep=True, hash_files=True).entries
        for blob in LAYERS
    }

    def from_tar(digest: str, path: str) -> LayerEntry | None:
        found = trees[digest].get(path)  # type: ignore[union-attr]
        return None if found is None else found.entry()

    stack = tuple(blob.digest for blob in LAYERS)
    with _images(node) as images, _overlay(node, tmp_path) as merged:
        kernel = _kernel(merged)
        for path in PATHS:
            for follow in (True, False):
                seen = kernel[f"{path} {follow}"]
                for look in (from_tar, lambda digest, p: images[digest].entry(p)):
                    found = locate(stack, path, look, follow=follow)
                    if seen is None:
                        assert isinstance(found, Miss), (path, follow, found)
                        continue
                    assert isinstance(found, Hit), (path, follow, found)
                    kind, mode, sha = seen
                    assert (found.entry.kind.value, found.entry.mode) == (kind, mode), (path, follow)
                    if look is from_tar:
                        assert found.entry.sha256 == sha, path


def test_opaque_directories_in_shared_attributes_and_large_directories(tmp_path: Path) -> None:
    # Four opaque directories: mkfs.erofs shares an attribute more than two inodes carry.
    names = [f"many/n{i:04d}-{'x' * 40}" for i in range(1000)]  # a directory of several blocks
    blob = layer_of(
        [
            *(item for d in "abcd" for item in (directory(d), opaque(d), regular(f"{d}/f", d.encode()))),
            directory("many"),
            *(regular(name, b"") for name in names),
        ]
    )
    root = tmp_path / "node"
    image = _convert(root, blob)
    with image.open("rb") as file:
        reader = ErofsImage(file, "test")
        for d in "abcd":
            entry = reader.entry(f"/{d}")
            assert entry is not None and entry.opaque
        for name in (names[0], names[500], names[-1]):
            assert reader.entry(f"/{name}") == LayerEntry(kind=EntryKind.FILE, mode=0o644)
        assert reader.entry("/many/n1000") is None


def test_a_damaged_image_is_a_resolve_error_never_a_crash(node: Path, tmp_path: Path) -> None:
    original = (node / "oci/blobs" / f"{LAYERS[1].hex}.erofs").read_bytes()
    randomness = random.Random(46)
    damaged = tmp_path / "damaged.erofs"
    for case in range(200):
        data = bytearray(original)
        if case == 0:
            data = data[: len(data) // 2]
        elif case == 1:
            data[1024:1028] = b"\0\0\0\0"
        else:
            for _ in range(8):
                data[randomness.randrange(1024, min(len(data), 8192))] = randomness.randrange(256)
        damaged.write_bytes(bytes(data))
        with damaged.open("rb") as file:
            try:
                reader = ErofsImage(file, "damaged")
                for path in PATHS:
                    reader.entry(path)
            except ResolveError as exc:
                assert exc.summary.startswith("damaged ")


def test_a_link_where_the_image_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "oci/blobs").mkdir(parents=True)
    (tmp_path / "elsewhere.erofs").write_bytes(b"")
    (tmp_path / "oci/blobs/x.erofs").symlink_to(tmp_path / "elsewhere.erofs")
    with (
        Tree.open(tmp_path, "cocoon root dir", "test") as tree,
        pytest.raises(StateError, match="symbolic link"),
        tree.open_file("oci/blobs/x.erofs"),
    ):
        pass
