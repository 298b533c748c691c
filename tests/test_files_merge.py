"""The offline merge behind ``expect.files``: real tar layers built by the fixture builder, read
by the product's layer reader, merged top down with OCI whiteout semantics.

Whiteouts, opaque directories, a file replaced and a file deleted in an upper layer, a file
deleted then added again, hard links, symbolic links (relative, absolute, looping, through a
directory link), a file shadowed by a directory, and a layer of 50,000 files read as a stream.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

import pytest

import ocifixture
from cocoonplan.planner.files import Hit, Look, Miss, Stack, Unknown, UnreadError, checks, locate
from cocoonplan.planner.model import FileVerdict
from cocoonplan.resolved import EntryKind, KnownImage, LayerEntry
from cocoonplan.resolvers.layerscan import TreeEntry, scan_layer
from cocoonplan.spec import Expectations
from filelayers import LAYERS, OS_RELEASE
from ocifixture import Blob, directory, layer_of, opaque, regular, whiteout


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _trees(layers: list[Blob], *, hash_files: bool = True) -> dict[str, Mapping[str, TreeEntry]]:
    trees = {}
    for blob in layers:
        scanned = scan_layer(io.BytesIO(blob.data), blob.digest, keep=True, hash_files=hash_files)
        assert scanned.entries is not None
        trees[blob.digest] = scanned.entries
    return trees


def _look(trees: Mapping[str, Mapping[str, TreeEntry]], unread: frozenset[str] = frozenset()) -> Look:
    def look(digest: str, path: str) -> LayerEntry | None:
        if digest in unread:
            raise UnreadError("not in this test")
        found = trees[digest].get(path)
        return None if found is None else found.entry()

    return look


STACK = tuple(b.digest for b in LAYERS)
LOOK = _look(_trees(LAYERS))


def _hit(path: str, *, follow: bool = True) -> Hit:
    found = locate(STACK, path, LOOK, follow=follow)
    assert isinstance(found, Hit), (path, found)
    return found


def test_a_file_of_the_bottom_layer_is_found_there() -> None:
    hit = _hit("/etc/os-release")
    assert (hit.layer, hit.entry.kind, hit.entry.mode, hit.entry.sha256) == (
        0,
        EntryKind.FILE,
        0o644,
        _sha(OS_RELEASE),
    )


def test_a_file_deleted_in_an_upper_layer_is_missing_and_says_by_which() -> None:
    assert locate(STACK, "/etc/gone", LOOK, follow=True) == Miss(hidden_by=1)


def test_a_file_deleted_then_added_again_comes_from_the_layer_that_added_it() -> None:
    hit = _hit("/etc/back")
    assert (hit.layer, hit.entry.sha256) == (2, _sha(b"v2\n"))


def test_an_opaque_directory_hides_the_lower_entries_and_keeps_its_own() -> None:
    assert locate(STACK, "/opt/app/old.txt", LOOK, follow=True) == Miss()
    assert locate(STACK, "/opt/app/keep.txt", LOOK, follow=True) == Miss()
    assert _hit("/opt/app/new.txt").layer == 1
    assert _hit("/opt/app").entry.opaque


def test_a_file_replaced_in_an_upper_layer_has_the_upper_content_and_mode() -> None:
    hit = _hit("/usr/bin/tool")
    assert (hit.layer, hit.entry.mode, hit.entry.sha256) == (1, 0o755, _sha(b"tool v2\n"))


def test_a_hard_link_is_the_file_it_links_to() -> None:
    hit = _hit("/data/d")
    assert (hit.layer, hit.entry.kind, hit.entry.mode, hit.entry.sha256) == (
        1,
        EntryKind.FILE,
        0o640,
        _sha(b"content of c\n"),
    )


def test_symbolic_links_are_followed_inside_the_guest_root() -> None:
    via_directory = _hit("/bin/sh")  # /bin -> usr/bin, relative
    assert (via_directory.path, via_directory.layer) == ("/usr/bin/sh", 0)
    relative = _hit("/etc/link")  # ../usr/bin/tool, resolved from /etc
    assert (relative.path, relative.layer, relative.entry.sha256) == ("/usr/bin/tool", 1, _sha(b"tool v2\n"))
    absolute = _hit("/usr/local/app/new.txt")  # /usr/local -> /opt, in layer 2
    assert (absolute.path, absolute.layer) == ("/opt/app/new.txt", 1)
    # A final link is an entry of its own when it is not followed (expect.absent).
    unfollowed = _hit("/etc/link", follow=False)
    assert (unfollowed.path, unfollowed.entry.kind, unfollowed.entry.target) == (
        "/etc/link",
        EntryKind.SYMLINK,
        "../usr/bin/tool",
    )


def test_a_link_loop_resolves_to_nothing() -> None:
    assert locate(STACK, "/etc/loop", LOOK, follow=True) == Miss()
    assert _hit("/etc/loop", follow=False).entry.kind is EntryKind.SYMLINK


def test_a_deleted_directory_hides_everything_below_it() -> None:
    assert locate(STACK, "/var/cache/x", LOOK, follow=True) == Miss(hidden_by=1)
    assert _hit("/var").layer == 1  # the layer holding the whiteout holds its directory too


def test_an_upper_directory_shadows_a_lower_file_of_the_same_name() -> None:
    assert _hit("/srv/plain").entry.kind is EntryKind.DIRECTORY
    assert _hit("/srv/plain/inner").layer == 1


def test_an_unreadable_layer_makes_only_the_answers_that_depend_on_it_unknown() -> None:
    look = _look(_trees(LAYERS), unread=frozenset({LAYERS[0].digest}))
    # Provided above the unreadable layer: certain.
    assert isinstance(locate(STACK, "/usr/bin/tool", look, follow=True), Hit)
    # In it, or nowhere: not known.
    assert locate(STACK, "/etc/os-release", look, follow=True) == Unknown(0, "not in this test")
    assert isinstance(locate(STACK, "/nowhere", look, follow=True), Unknown)
    # Hidden above it by a whiteout or an opaque directory: certain.
    assert locate(STACK, "/etc/gone", look, follow=True) == Miss(hidden_by=1)
    assert locate(STACK, "/opt/app/old.txt", look, follow=True) == Miss()


def test_checks_say_what_holds_what_fails_and_where_else_a_missing_file_is() -> None:
    expect = Expectations(
        files=[
            "/etc/os-release",
            {"path": "/usr/bin/tool", "sha256": _sha(b"tool v2\n"), "mode": "0755"},
            {"path": "/etc/back", "sha256": _sha(b"v1\n")},
            {"path": "/data/d", "mode": "0644"},
            "/etc/gone",
            {"path": "/opt/app", "sha256": _sha(b"")},
        ],
        absent=["/opt/app/old.txt", "/etc/link"],
    )
    older = KnownImage(ref="example.com/base:1", digest=f"sha256:{'1' * 64}", layers=(LAYERS[0].digest,))
    found = {c.path: c for c in checks(expect, Stack(STACK, "its 3 planned layers"), [older], LOOK)}

    assert found["/etc/os-release"].verdict is FileVerdict.HOLDS
    assert (found["/usr/bin/tool"].verdict, found["/usr/bin/tool"].found_mode) == (FileVerdict.HOLDS, "0755")
    assert found["/etc/back"].verdict is FileVerdict.FAILS
    assert "sha256 is" in found["/etc/back"].message
    assert found["/data/d"].message == f"in layer 1 ({LAYERS[1].hex[:12]}): its mode is 0640, not 0644"
    gone = found["/etc/gone"]
    assert (gone.verdict, gone.found) == (FileVerdict.FAILS, False)
    assert gone.message == (
        f"missing from its 3 planned layers, deleted by a whiteout in layer 1 ({LAYERS[1].hex[:12]}); "
        f"layer 0 ({LAYERS[0].hex[:12]}) of example.com/base:1 provides it"
    )
    assert [(s.image, s.layer, s.layer_digest) for s in gone.provided_by] == [
        ("example.com/base:1", 0, LAYERS[0].digest)
    ]
    assert "it is a directory, not a regular file" in found["/opt/app"].message
    assert found["/opt/app/old.txt"].verdict is FileVerdict.HOLDS
    link = found["/etc/link"]
    assert (link.verdict, link.kind, link.layer) == (FileVerdict.FAILS, EntryKind.SYMLINK, 1)


def test_a_content_hash_is_unknown_when_the_layer_was_not_hashed() -> None:
    look = _look(_trees(LAYERS, hash_files=False))
    expect = Expectations(files=[{"path": "/etc/os-release", "sha256": _sha(OS_RELEASE)}])
    (only,) = checks(expect, Stack(STACK, "its 3 planned layers"), [], look)
    assert only.verdict is FileVerdict.UNKNOWN and only.found


def test_a_layer_of_50000_files_is_read_as_a_stream(tmp_path: Path) -> None:
    content = b"0123456789abcdef" * 128  # 2 KiB a file, well compressed: the tar is 128 MiB
    files = [
        entry
        for d in range(100)
        for entry in (
            directory(f"srv/d{d:03d}"),
            *(regular(f"srv/d{d:03d}/f{f:04d}.txt", content) for f in range(500)),
        )
    ]
    base = layer_of(files, compresslevel=1)
    upper = layer_of(
        [whiteout("srv/d007/f0100.txt"), opaque("srv/d042"), regular("srv/d042/only.txt", b"only\n")]
    )
    blob = tmp_path / "layer"
    blob.write_bytes(base.data)
    with gzip.open(blob) as tar:
        tar_size = sum(len(chunk) for chunk in iter(lambda: tar.read(1 << 20), b""))

    tracemalloc.start()
    try:
        with blob.open("rb") as stream:
            scanned = scan_layer(stream, base.digest, keep=True, hash_files=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert scanned.entries is not None and len(scanned.entries) == 50_000 + 100 + 2  # with /srv and /
    assert peak < tar_size / 5, f"{peak} bytes in use while reading a {tar_size}-byte tar"
    trees = {base.digest: scanned.entries, **_trees([upper])}
    stack, look = (base.digest, upper.digest), _look(trees)
    assert locate(stack, "/srv/d007/f0100.txt", look, follow=True) == Miss(hidden_by=1)
    kept = locate(stack, "/srv/d007/f0101.txt", look, follow=True)
    assert isinstance(kept, Hit) and (kept.layer, kept.entry.sha256) == (0, _sha(content))
    assert locate(stack, "/srv/d042/f0000.txt", look, follow=True) == Miss()
    assert isinstance(locate(stack, "/srv/d042/only.txt", look, follow=True), Hit)


@pytest.mark.parametrize("name", ["/abs/file", "./dot/file", "a//b/c"])
def test_entry_names_are_read_as_guest_paths(name: str) -> None:
    blob = layer_of([regular(name, b"x")])
    found = scan_layer(io.BytesIO(blob.data), blob.digest, keep=True).entries
    assert found is not None
    assert ("/" + "/".join(p for p in name.split("/") if p not in ("", "."))) in found


def test_a_name_with_dot_dot_never_reaches_the_tree() -> None:
    blob = layer_of([regular("../escape", b"x"), regular("ok", b"y")])
    found = scan_layer(io.BytesIO(blob.data), blob.digest, keep=True).entries
    assert found is not None and set(found) == {"/", "/ok"}


def test_fixture_layers_round_trip_through_the_fixtures_own_reader() -> None:
    # The fixture (independent of cocoonplan) and the product agree on what a layer holds.
    for blob in LAYERS:
        scanned = scan_layer(io.BytesIO(blob.data), blob.digest, keep=True, hash_files=True).entries
        assert scanned is not None
        for name, data in ocifixture.files_of(blob).items():
            if "/.wh." in f"/{name}":
                continue
            assert scanned["/" + name].sha256 == _sha(data)
