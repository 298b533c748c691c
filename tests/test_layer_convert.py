"""Layers as `cocoon image pull` leaves them: real mkfs.erofs, fsck.erofs and dump.erofs on the
result, fixture layers from ocifixture (an independent witness of the boot rules) and hand-made
hostile tars."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import ocifixture
from cocoonplan.errors import ApplyError
from cocoonplan.executors import layers as layers_module
from cocoonplan.executors.layers import (
    LayerBlob,
    UnpackLimits,
    convert_layer,
    convert_layers,
    go_time,
    record_image,
)
from cocoonplan.resolvers.node import read_node_root

pytestmark = pytest.mark.usefixtures("erofs_as_root")

CLOCK = datetime(2026, 5, 13, 8, 1, 12, 410000, tzinfo=UTC)


def _clock() -> datetime:
    return CLOCK


# --------------------------------------------------------------------------- helpers


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: Any) -> tuple[Any, ...]:
    return (name, kind, data, fields)


def _tar(*entries: tuple[Any, ...], pax: dict[str, dict[str, str]] | None = None) -> bytes:
    """An uncompressed tar of the entries, in the order given (as a hostile layer orders them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, fields in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, 0o644 if kind != tarfile.DIRTYPE else 0o755, 0
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            info.pax_headers = (pax or {}).get(name, {})
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _blob(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / "blobs-in" / digest.removeprefix("sha256:")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path, digest


def _dump(*args: str) -> str:
    done = subprocess.run(["dump.erofs", *args], capture_output=True, text=True, check=True)
    assert "<E>" not in done.stderr, done.stderr  # dump.erofs exits 0 on a missing path
    return done.stdout


def _listing(image: Path, directory: str) -> dict[str, int]:
    """{name: EROFS type} of a directory: 1 file, 2 dir, 3 char device, 7 symlink."""
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+(\S+)$", _dump("--ls", f"--path={directory}", str(image)), re.M)
    return {name: int(kind) for kind, name in rows if name not in (".", "..")}


def _inode(image: Path, path: str) -> tuple[int, int, int]:
    """(uid, gid, permission bits as dump.erofs 1.5 shows them: without set-id bits)."""
    found = re.search(r"Uid: (\d+)\s+Gid: (\d+)\s+Access: (\d+)/", _dump(f"--path={path}", str(image)))
    assert found is not None
    return int(found[1]), int(found[2]), int(found[3], 8)


def _extract(image: Path, target: Path) -> Path:
    subprocess.run(["fsck.erofs", f"--extract={target}", str(image)], check=True, capture_output=True)
    return target


def _installed(root: Path) -> list[str]:
    """Everything under the node root's final names, and what is left in its scratch area."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.parent.name == "temp")


@contextlib.contextmanager
def _mounted(image: Path, target: Path) -> Iterator[Path | None]:
    """The image mounted read-only, or None where this machine cannot loop-mount."""
    target.mkdir()
    done = subprocess.run(
        ["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(target)], capture_output=True
    )
    try:
        yield target if done.returncode == 0 else None
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", str(target)], check=True)


# --------------------------------------------------------------------------- conversion


def test_fixture_layer_converts_to_valid_erofs_with_cocoons_uuid(tmp_path: Path) -> None:
    files = {"etc/os-release": b"ID=test\n", "usr/bin/tool": b"#!/bin/sh\n", "boot/vmlinuz-6.1": b"K"}
    layer = ocifixture.layer(files)
    blob, digest = _blob(tmp_path, layer.data)
    root = tmp_path / "node"

    done = convert_layer(blob, digest, root)

    image = root / "oci/blobs" / f"{layer.hex}.erofs"
    assert done.erofs == image and done.erofs_size == image.stat().st_size
    assert subprocess.run(["fsck.erofs", str(image)], capture_output=True).returncode == 0
    expected_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, layer.hex))
    assert re.search(rf"UUID:\s+{expected_uuid}$", _dump("-s", str(image)), re.M)
    tree = _extract(image, tmp_path / "x")
    for name, data in ocifixture.files_of(layer).items():
        assert (tree / name).read_bytes() == data
        assert _inode(image, f"/{name}") == (0, 0, 0o644)
    assert _inode(image, "/usr/bin") == (0, 0, 0o755)
    assert _listing(image, "/") == {"boot": 2, "etc": 2, "usr": 2}
    assert _installed(root) == [f"oci/blobs/{layer.hex}.erofs", f"oci/boot/{layer.hex}/vmlinuz"]


def test_whiteouts_links_devices_and_ownership_as_an_overlay_lower_layer_needs(tmp_path: Path) -> None:
    data = _tar(
        _entry("./", tarfile.DIRTYPE),
        _entry("etc", tarfile.DIRTYPE, mode=0o750, uid=0, gid=4),
        _entry("etc/.wh..wh..opq"),
        _entry("etc/.wh.removed"),
        _entry("etc/.wh..wh.plnk"),  # aufs bookkeeping: skipped
        _entry("etc/sudo", data=b"s", mode=0o4750, uid=1000, gid=27),
        _entry("etc/hard", tarfile.LNKTYPE, linkname="etc/sudo"),
        _entry("etc/shadow-link", tarfile.SYMTYPE, linkname="/etc/shadow"),
        _entry("dev", tarfile.DIRTYPE),
        _entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        _entry("deep/implicit/file", data=b"x"),
        _entry("caps", data=b"c"),
        pax={"caps": {"SCHILY.xattr.user.note": "kept"}},
    )
    blob, digest = _blob(tmp_path, data)
    root = tmp_path / "node"

    convert_layer(blob, digest, root)

    image = root / "oci/blobs" / f"{digest[7:]}.erofs"
    assert subprocess.run(["fsck.erofs", str(image)], capture_output=True).returncode == 0
    assert _listing(image, "/etc") == {"hard": 1, "removed": 3, "shadow-link": 7, "sudo": 1}
    assert _listing(image, "/dev") == {"null": 3}
    assert _inode(image, "/etc") == (0, 4, 0o750)
    assert _inode(image, "/etc/sudo") == (1000, 27, 0o750)
    assert _inode(image, "/etc/removed") == (0, 0, 0)
    assert _inode(image, "/deep/implicit") == (0, 0, 0o755)
    assert "Links: 2" in _dump("--path=/etc/sudo", str(image))
    # The opaque marker, as EROFS stores an inline xattr: name length, index 4 (trusted.), value size.
    assert bytes([14, 4, 1, 0]) + b"overlay.opaquey" in image.read_bytes()
    tree = _extract(image, tmp_path / "x")
    assert (tree / "etc/shadow-link").readlink() == Path("/etc/shadow")
    assert (tree / "dev/null").lstat().st_rdev == os.makedev(1, 3)
    with _mounted(image, tmp_path / "mnt") as mounted:
        if mounted is not None:  # what overlayfs reads: set-uid, the 0:0 whiteout, the xattrs
            assert (mounted / "etc/sudo").stat().st_mode & 0o7777 == 0o4750
            assert (mounted / "etc/removed").lstat().st_rdev == 0
            assert os.getxattr(mounted / "etc", "trusted.overlay.opaque") == b"y"
            assert os.getxattr(mounted / "caps", "user.note") == b"kept"


def test_boot_files_follow_cocoons_rules(tmp_path: Path) -> None:
    root = tmp_path / "node"
    first = ocifixture.layer(
        {
            "boot/vmlinuz-1": b"K1",
            "boot/vmlinuz-2": b"K2",
            "boot/initrd.img-2": b"I2",
            "boot/vmlinuz-3.old": b"O",
        }
    )
    # Links never count: neither the top-level `vmlinuz` symlink nor a hard-linked initrd.
    linked = _tar(
        _entry("boot/initrd.real", data=b"I"),
        _entry("boot/initrd.img", tarfile.LNKTYPE, linkname="boot/initrd.real"),
        _entry("vmlinuz", tarfile.SYMTYPE, linkname="boot/vmlinuz-1"),
        _entry("boot/vmlinuz", tarfile.SYMTYPE, linkname="vmlinuz-1"),
    )
    for data in (first.data, linked):
        blob, digest = _blob(tmp_path, data)
        done = convert_layer(blob, digest, root)
        boot = root / "oci/boot" / digest[7:]
        if data is first.data:
            kernel, initrd = ocifixture.boot_files(first)
            assert (done.kernel, done.initrd) == (True, True)
            assert (boot / "vmlinuz").read_bytes() == kernel == b"K2"  # the last entry in the tar wins
            assert (boot / "initrd.img").read_bytes() == initrd == b"I2"
        else:
            assert (done.kernel, done.initrd) == (False, False)
            assert not boot.exists()


def test_zstd_without_a_decoder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on every Python before 3.14, whatever this one is: no compression.zstd to import.
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    blob, digest = _blob(tmp_path, b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    with pytest.raises(ApplyError, match=f"layer {digest} is zstd-compressed"):
        convert_layer(blob, digest, tmp_path / "node")
    assert _installed(tmp_path / "node") == []


HOSTILE = {
    "parent escape": (_tar(_entry("../escape", data=b"x")), "'../escape'", "`..` component"),
    "absolute path": (_tar(_entry("/abs", data=b"x")), "'/abs'", "absolute path"),
    "write through a symlink": (
        _tar(
            _entry("d", tarfile.SYMTYPE, linkname="/etc"), _entry("d/passwd", data=b"root::0:0::/:/bin/sh\n")
        ),
        "'d/passwd'",
        "lies below d, which this layer made a symbolic link",
    ),
    "hard link out": (
        _tar(_entry("shadow", tarfile.LNKTYPE, linkname="/etc/shadow")),
        "'shadow'",
        "absolute path as its link target",
    ),
    "hard link up": (
        _tar(_entry("shadow", tarfile.LNKTYPE, linkname="../../etc/shadow")),
        "'shadow'",
        "`..` component in its link target",
    ),
    "hard link to nothing": (
        _tar(_entry("a", tarfile.LNKTYPE, linkname="missing")),
        "'a'",
        "no earlier file",
    ),
    "huge declared size": (
        _tar(_entry("ok", data=b"fine"), _entry("huge", size=1 << 40)),
        "'huge'",
        "declares 1099511627776 bytes, past the limit",
    ),
    "forged overlay xattr": (
        _tar(_entry("dir", tarfile.DIRTYPE), pax={"dir": {"SCHILY.xattr.trusted.overlay.redirect": "/x"}}),
        "'dir'",
        "only whiteouts may set",
    ),
    "whiteout of dot-dot": (_tar(_entry("a/.wh...")), "'a/.wh...'", "whiteout of no name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_with_nothing_installed(tmp_path: Path, case: str) -> None:
    data, entry, problem = HOSTILE[case]
    blob, digest = _blob(tmp_path, data)
    root = tmp_path / "node"
    before = Path("/etc/passwd").read_bytes()

    with pytest.raises(ApplyError) as failure:
        convert_layer(blob, digest, root)

    message = str(failure.value)
    assert f"layer {digest}: entry {entry}" in message and problem in message
    assert _installed(root) == []  # no final name, and the scratch directory is gone
    assert Path("/etc/passwd").read_bytes() == before
    assert not (tmp_path.parent / "escape").exists()


def test_entry_count_is_bounded_and_configurable(tmp_path: Path) -> None:
    blob, digest = _blob(tmp_path, _tar(*(_entry(f"f{i}", data=b"x") for i in range(5))))
    with pytest.raises(ApplyError, match="'f3' is past the limit of 3 entries"):
        convert_layer(blob, digest, tmp_path / "node", UnpackLimits(max_entries=3))
    convert_layer(blob, digest, tmp_path / "node", UnpackLimits(max_entries=5))


def test_a_failed_mkfs_installs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = ocifixture.layer({"boot/vmlinuz": b"K", "boot/initrd.img": b"I"})
    blob, digest = _blob(tmp_path, layer.data)
    monkeypatch.setattr(layers_module, "MKFS_FLAGS", ("--no-such-flag",))
    with pytest.raises(ApplyError, match=f"mkfs.erofs failed on layer {digest}"):
        convert_layer(blob, digest, tmp_path / "node")
    assert _installed(tmp_path / "node") == []  # not even the boot files


def test_layers_convert_in_parallel(tmp_path: Path) -> None:
    blobs = [ocifixture.layer({f"layer{i}/file": bytes([i]) * 4096}) for i in range(3)]
    given = [LayerBlob(digest=d, path=p) for p, d in (_blob(tmp_path, b.data) for b in blobs)]
    root = tmp_path / "node"

    done = convert_layers([*given, given[0]], root, workers=2)

    assert [layer.digest for layer in done] == [b.digest for b in blobs]
    for layer in done:
        assert subprocess.run(["fsck.erofs", str(layer.erofs)], capture_output=True).returncode == 0
    assert sorted(p.name for p in (root / "oci/blobs").iterdir()) == sorted(f"{b.hex}.erofs" for b in blobs)


def test_a_failure_among_parallel_conversions_is_raised(tmp_path: Path) -> None:
    good = ocifixture.layer({"a": b"a"})
    bad_path, bad_digest = _blob(tmp_path, _tar(_entry("/abs")))
    good_path, _ = _blob(tmp_path, good.data)
    given = [LayerBlob(digest=good.digest, path=good_path), LayerBlob(digest=bad_digest, path=bad_path)]
    with pytest.raises(ApplyError, match=f"layer {bad_digest}"):
        convert_layers(given, tmp_path / "node")
    assert _installed(tmp_path / "node") == ["oci/blobs/" + f"{good.hex}.erofs"]


# --------------------------------------------------------------------------- images.json


def _converted_image(tmp_path: Path, root: Path) -> ocifixture.Artifact:
    base = ocifixture.layer({"etc/os-release": b"ID=test\n"})
    boot = ocifixture.layer({"boot/vmlinuz-6.1": b"kernel" * 10, "boot/initrd.img-6.1": b"initrd" * 20})
    image = ocifixture.image([base, boot])
    convert_layers([LayerBlob(digest=b.digest, path=_blob(tmp_path, b.data)[0]) for b in (base, boot)], root)
    return image


def test_image_record_is_written_as_cocoon_writes_it_and_read_back(tmp_path: Path) -> None:
    root = tmp_path / "node"
    image = _converted_image(tmp_path, root)
    base, boot = image.layers
    key = f"registry.test/os@{image.digest}"
    existing = {"images": {"a:1": {"ref": "a:1", "manifest_digest": base.digest, "layers": [], "size": 1}}}
    (root / "oci/db").mkdir(parents=True)
    (root / "oci/db/images.json").write_text(json.dumps(existing))

    record = record_image(
        root, key, image.digest, [base.digest, boot.digest], boot.digest, boot.digest, clock=_clock
    )

    text = (root / "oci/db/images.json").read_bytes()
    sizes = sum((root / "oci/blobs" / f"{b.hex}.erofs").stat().st_size for b in (base, boot)) + 60 + 120
    entry = (
        f'{{"ref":"{key}","manifest_digest":"{image.digest}","layers":[{{"digest":"{base.digest}"}},'
        f'{{"digest":"{boot.digest}"}}],"kernel_layer":"{boot.digest}","initrd_layer":"{boot.digest}",'
        f'"size":{sizes},"created_at":"2026-05-13T08:01:12.41Z"}}'
    )
    old = json.dumps(existing["images"]["a:1"], separators=(",", ":"))
    assert text == f'{{"images":{{"a:1":{old},"{key}":{entry}}}}}\n'.encode()
    assert record.size == sizes
    assert (root / "oci/db/images.lock").is_file()
    state = read_node_root(root)
    ours = next(i for i in state.images if i.ref == key)
    assert ours.manifest_digest == image.digest and ours.kernel_layer == boot.digest
    assert list(ours.layers) == [base.digest, boot.digest]
    assert sorted(state.blobs) == sorted([base.hex, boot.hex])


def test_image_record_refuses_a_sqlite_node_and_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "node"
    image = _converted_image(tmp_path, root)
    base, boot = image.layers
    with pytest.raises(ApplyError, match=r"initrd layer .* is not one of its layers"):
        record_image(root, "k", image.digest, [base.digest], base.digest, boot.digest, clock=_clock)
    with pytest.raises(ApplyError, match=r"boot/.*/vmlinuz \(kernel\) is not installed"):
        record_image(
            root, "k", image.digest, [base.digest, boot.digest], base.digest, boot.digest, clock=_clock
        )
    (root / "meta").mkdir()
    (root / "meta/meta.db").write_bytes(b"")
    with pytest.raises(ApplyError, match="cocoon image pull k"):
        record_image(
            root, "k", image.digest, [base.digest, boot.digest], boot.digest, boot.digest, clock=_clock
        )
    assert not (root / "oci/db/images.json").exists()


def test_an_unreadable_index_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "node"
    image = _converted_image(tmp_path, root)
    base, boot = image.layers
    (root / "oci/db").mkdir(parents=True)
    (root / "oci/db/images.json").write_text('{"images": [}')
    with pytest.raises(ApplyError, match="is not cocoon's image index"):
        record_image(
            root, "k", image.digest, [base.digest, boot.digest], boot.digest, boot.digest, clock=_clock
        )
    assert (root / "oci/db/images.json").read_text() == '{"images": [}'


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 5, 13, 8, 1, 12, tzinfo=UTC), "2026-05-13T08:01:12Z"),
        (datetime(2026, 5, 13, 8, 1, 12, 123400, tzinfo=UTC), "2026-05-13T08:01:12.1234Z"),
        (
            datetime(2026, 5, 13, 8, 1, 12, 5, tzinfo=timezone(timedelta(hours=8))),
            "2026-05-13T08:01:12.000005+08:00",
        ),
        (
            datetime(2026, 5, 13, 8, 1, 12, tzinfo=timezone(-timedelta(hours=3, minutes=30))),
            "2026-05-13T08:01:12-03:30",
        ),
    ],
)
def test_created_at_is_gos_rfc3339(moment: datetime, text: str) -> None:
    assert go_time(moment) == text
