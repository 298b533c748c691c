"""cocoon's metadata, read from both engines: a JSON-engine node root (``ocifixture.node_root``)
and the same root converted to SQLite as ``cocoon meta convert`` does (``metafixture``) give
the same tables. The SQLite store is only ever read, live or copied, with or without its
WAL; a root mid-conversion, a broken store and a broken row are refused with one line naming
``meta/meta.db`` and the table. The JSON engine's ``.prev`` fallback and tombstones are pure
functions, tested on bytes and tables directly. Roots are read through the node file-system
seam (``nodefs.Tree``), as the node reader reads them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, cast

import pytest

from clirunner import EXAMPLES
from cocoonplan.cocoon import MetadataEngine
from cocoonplan.errors import StateError
from cocoonplan.nodefs import Cap, Tree
from cocoonplan.resolvers import metastore
from cocoonplan.resolvers.metastore import (
    CONVERT_MANIFEST,
    IMAGES,
    META_DB,
    META_WAL,
    SNAPSHOTS,
    VM_NAMESPACES,
    Metadata,
    NamespaceTables,
    TombstonePhase,
    decode_json_namespace,
    detect_engine,
    live,
    meta_files_present,
    read_json_tree,
    read_metadata,
    read_sqlite_tree,
)
from metafixture import convert_root, live_writer, put_rows, write_sqlite_meta
from ocifixture import (
    Clone,
    Nic,
    NodeVM,
    Run,
    SourceVM,
    derive_id,
    go_json,
    image,
    layer,
    node_root,
    snapshot,
)

CH = VM_NAMESPACES["cloud-hypervisor"]
VMS_DB = "cloudhypervisor/db/vms.json"
BASE = image(
    [
        layer({"etc/os-release": b"ID=ubuntu\n"}),
        layer({"boot/vmlinuz-6.1": b"k", "boot/initrd.img-6.1": b"i"}),
    ]
)
SNAP = snapshot(BASE, base_ref="b:1", vm=SourceVM(id="UJZDEGXDNCF32EPF3DHODZDOCI", name="src"))
CLONE_ID = derive_id("meta", "web")
RUN_ID = derive_id("meta", "worker")
GONE_ID = derive_id("meta", "gone")
SNAPSHOT_ID = "S2JHTLGMXGEDN73U55XTPLPFT7"
ORPHAN_DIR = f"/var/lib/cocoon/run/cloudhypervisor/{derive_id('meta', 'orphan')}"


def _tombstone(phase: str) -> dict[str, Any]:
    return {
        "lease_id": "LEASE",
        "phase": phase,
        "leased_at": "2026-07-21T08:00:00Z",
        "payload": {"kind": "record", "mode": "aggregate", "cleanup": {}},
    }


def _add_keys(path: Path, **keys: Any) -> None:
    document = json.loads(path.read_bytes())
    path.write_bytes(go_json({**document, **keys}))


@pytest.fixture(scope="module")
def json_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A v0.3.8-style root plus what later JSON-engine releases add: a VM being deleted
    (tombstoned ``deleting``), an orphan dir, and a snapshot whose delete is ``leased``."""
    root = tmp_path_factory.mktemp("json-root")
    vms = [
        NodeVM(id=CLONE_ID, name="web", source=Clone(SNAP), nics=[Nic(ip="10.22.0.9", gateway="10.22.0.1")]),
        NodeVM(id=RUN_ID, name="worker", source=Run("b:1"), state="stopped"),
        NodeVM(id=GONE_ID, name="gone", source=Run("b:1"), state="stopped"),
    ]
    snap = {"id": SNAPSHOT_ID, "name": "baked", "created_at": "2026-05-14T09:12:33Z"}
    node_root(root, images={"b:1": BASE}, vms=vms, snapshots={SNAPSHOT_ID: snap})
    _add_keys(root / VMS_DB, orphan_dirs=[ORPHAN_DIR], tombstones={GONE_ID: _tombstone("deleting")})
    _add_keys(root / SNAPSHOTS.file, tombstones={SNAPSHOT_ID: _tombstone("leased")})
    return root


@pytest.fixture
def sqlite_root(json_root: Path, tmp_path: Path) -> Path:
    """``json_root`` after ``cocoon meta convert``."""
    root = tmp_path / "sqlite-root"
    shutil.copytree(json_root, root)
    convert_root(root)
    return root


def _read(root: Path) -> Metadata:
    with Tree.open(root, "cocoon root dir", "copy the root again") as tree:
        return read_metadata(tree)


def _files(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def _execute(db: Path, *statements: str) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as connection:
        for statement in statements:
            connection.execute(statement)


def _refused(call: Callable[[], object]) -> StateError:
    with pytest.raises(StateError) as caught:
        call()
    error = caught.value
    assert "\n" not in error.summary and error.hint, error.render()
    return error


# --------------------------------------------------------------------------- both engines, same tables


def test_a_converted_root_reads_the_same_tables_as_its_json_root(json_root: Path, sqlite_root: Path) -> None:
    from_json, from_sqlite = _read(json_root), _read(sqlite_root)
    assert (from_json.engine, from_sqlite.engine) == (MetadataEngine.JSON, MetadataEngine.SQLITE)
    assert from_sqlite.tables == from_json.tables
    vms = from_sqlite.of(CH)
    assert sorted(vms.records) == sorted([CLONE_ID, RUN_ID, GONE_ID])
    assert vms.names == {"gone": GONE_ID, "web": CLONE_ID, "worker": RUN_ID}
    assert vms.orphan_dirs == (ORPHAN_DIR,)
    assert vms.tombstones == {GONE_ID: _tombstone("deleting")}
    assert list(from_sqlite.of(IMAGES).records) == ["b:1"]
    assert from_sqlite.of(SNAPSHOTS).names == {"baked": SNAPSHOT_ID}
    assert set(from_sqlite.sources.values()) == {META_DB}
    assert from_json.sources[CH.name] == VMS_DB


def test_the_example_nodes_tables_survive_conversion(tmp_path: Path) -> None:
    converted = tmp_path / "node"
    shutil.copytree(EXAMPLES / "node", converted)
    convert_root(converted)
    with Tree.open(converted, "root", "") as tree:
        assert meta_files_present(tree) == {META_DB}  # the JSON files were renamed aside
    with Tree.open(EXAMPLES / "node", "root", "") as tree:
        from_json = read_json_tree(tree)
    assert _read(converted).tables == from_json.tables
    with closing(sqlite3.connect(converted / META_DB)) as connection:
        rows = connection.execute(
            "SELECT state, source, records FROM meta_state WHERE namespace = ?", (CH.name,)
        )
        assert rows.fetchall() == [("converted", f"/var/lib/cocoon/{VMS_DB}", len(from_json.of(CH).records))]


def test_a_store_made_fresh_by_a_current_release_reads_like_the_json_files(
    json_root: Path, tmp_path: Path
) -> None:
    # A node first set up with a current release: `cocoon meta init`, then records put one by one.
    documents = {ns.name: json.loads((json_root / ns.file).read_bytes()) for ns in (CH, SNAPSHOTS, IMAGES)}
    db = write_sqlite_meta(tmp_path, documents)
    with closing(sqlite3.connect(db)) as connection:
        assert {state for (state,) in connection.execute("SELECT state FROM meta_state")} == {"initialized"}
    assert _read(tmp_path).tables == _read(json_root).tables


def test_a_root_without_metadata_reads_as_empty(tmp_path: Path) -> None:
    metadata = _read(tmp_path)
    assert metadata.engine is None
    assert all(tables == NamespaceTables() for tables in metadata.tables.values())


# --------------------------------------------------------------------------- read-only, WAL-safe


def test_reading_the_store_writes_and_creates_nothing(sqlite_root: Path) -> None:
    before = _files(sqlite_root / "meta")
    assert list(before) == ["meta.db"]  # cocoon's last close checkpointed and removed the WAL
    _read(sqlite_root)
    _read(sqlite_root)
    assert _files(sqlite_root / "meta") == before


def test_transactions_still_in_the_wal_of_a_live_store_are_read(sqlite_root: Path) -> None:
    db = sqlite_root / META_DB
    with live_writer(db) as cocoon:
        put_rows(cocoon, IMAGES.name, {"records": {"new:1": go_json({"ref": "new:1"})}})
        before = _files(db.parent)
        assert sorted(before) == ["meta.db", "meta.db-shm", "meta.db-wal"]
        assert "new:1" in _read(sqlite_root).of(IMAGES).records
        assert _files(db.parent) == before


def test_a_copy_with_its_wal_but_without_the_shm_is_read_whole(sqlite_root: Path, tmp_path: Path) -> None:
    db = sqlite_root / META_DB
    copy = tmp_path / "copy"
    (copy / "meta").mkdir(parents=True)
    with live_writer(db) as cocoon:
        put_rows(cocoon, CH.name, {"names": {"late": go_json(RUN_ID)}})
        for name in ("meta.db", "meta.db-wal"):
            shutil.copy2(db.parent / name, copy / "meta" / name)
    before = _files(copy / "meta")
    assert _read(copy).of(CH).names["late"] == RUN_ID
    assert _files(copy / "meta") == before  # no -shm made beside the copy


class _Checkpointing:
    """A root whose meta.db differs on every read, as if cocoon checkpointed each time."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def read(self, rel: str, cap: Cap) -> bytes | None:
        self.reads.append(rel)
        return None if rel == META_WAL else str(len(self.reads)).encode()


def test_a_store_checkpointed_while_it_is_read_is_read_again_then_refused() -> None:
    root = _Checkpointing()
    error = _refused(lambda: read_sqlite_tree(cast(Tree, root)))
    assert error.summary == f"{META_DB}: changed while being read, 3 times"
    assert root.reads == [META_DB, META_WAL, META_DB] * 3


def test_a_linked_store_is_refused_not_followed(sqlite_root: Path) -> None:
    db = sqlite_root / META_DB
    db.rename(db.with_name("elsewhere.db"))
    db.symlink_to("elsewhere.db")
    assert _refused(lambda: _read(sqlite_root)).summary.startswith(f"{META_DB}: is a symbolic link")


# --------------------------------------------------------------------------- which engine


@pytest.mark.parametrize(
    ("present", "engine"),
    [
        ((), None),
        ((META_DB,), MetadataEngine.SQLITE),
        ((VMS_DB,), MetadataEngine.JSON),
        (("cni/db/networks.json",), MetadataEngine.JSON),
        ((META_DB, f"{VMS_DB}.converted-20260721T080000Z"), MetadataEngine.SQLITE),
    ],
)
def test_the_engine_is_the_one_cocoon_picks(present: tuple[str, ...], engine: MetadataEngine | None) -> None:
    assert detect_engine(present) is engine


@pytest.mark.parametrize(
    ("present", "named"),
    [
        ((CONVERT_MANIFEST,), CONVERT_MANIFEST),
        ((CONVERT_MANIFEST, META_DB), CONVERT_MANIFEST),
        ((CONVERT_MANIFEST, VMS_DB), CONVERT_MANIFEST),
        ((META_DB, IMAGES.file), f"{META_DB}: and {IMAGES.file} are both present"),
    ],
)
def test_a_root_being_converted_is_refused(present: tuple[str, ...], named: str) -> None:
    error = _refused(lambda: detect_engine(present))
    assert error.summary.startswith(named)
    assert (
        error.hint == "the root is being converted: run `cocoon meta convert` to completion, then plan again"
    )


def test_a_converted_root_with_a_manifest_or_a_json_file_left_is_refused(
    sqlite_root: Path, json_root: Path
) -> None:
    (sqlite_root / CONVERT_MANIFEST).write_text("{}")
    assert _refused(lambda: _read(sqlite_root)).summary.startswith(CONVERT_MANIFEST)
    (sqlite_root / CONVERT_MANIFEST).unlink()
    shutil.copy(json_root / VMS_DB, sqlite_root / VMS_DB)
    assert VMS_DB in _refused(lambda: _read(sqlite_root)).summary


# --------------------------------------------------------------------------- broken stores and rows


def _sql(*statements: str) -> Callable[[Path], None]:
    return lambda db: _execute(db, *statements)


@pytest.mark.parametrize(
    ("damage", "summary"),
    [
        (lambda db: db.write_bytes(b"not a database " * 100), f"{META_DB}: not a SQLite database"),
        (lambda db: db.write_bytes(b""), f"{META_DB}: application_id 0x00000000 is not cocoon's"),
        (
            _sql("PRAGMA application_id = 1"),
            f"{META_DB}: application_id 0x00000001 is not cocoon's 0x434f434e",
        ),
        (_sql("PRAGMA user_version = 2"), f"{META_DB}: user_version 2 is a schema generation"),
        (_sql("DROP TABLE meta_state"), f"{META_DB}: table meta_state is missing"),
        (
            _sql("DELETE FROM meta_state WHERE namespace = 'snapshots'"),
            f"{META_DB}: table meta_state has no row for namespace snapshots",
        ),
        (
            _sql('DROP TABLE "vms_cloudhypervisor__names"'),
            f"{META_DB}: table vms_cloudhypervisor__names is missing",
        ),
        (
            _sql("UPDATE images_oci__records SET data = CAST('{\"ref\":' AS BLOB)"),
            f"{META_DB}: table images_oci__records, row 'b:1': not valid JSON: Expecting value",
        ),
        (
            _sql("""UPDATE images_oci__records SET data = '{"ref":"b:1","ref":"b:2"}'"""),
            f"{META_DB}: table images_oci__records, row 'b:1': not valid JSON: key 'ref' appears twice",
        ),
        (
            _sql("UPDATE images_oci__records SET data = x'ff'"),
            f"{META_DB}: table images_oci__records, row 'b:1': not UTF-8 text",
        ),
        (
            _sql(
                "DROP TABLE images_oci__records",
                "CREATE TABLE images_oci__records (id TEXT PRIMARY KEY, blob TEXT)",
            ),
            f"{META_DB}: table images_oci__records: no such column: data",
        ),
    ],
)
def test_a_broken_store_or_row_is_one_line_naming_the_table(
    sqlite_root: Path, damage: Callable[[Path], None], summary: str
) -> None:
    damage(sqlite_root / META_DB)
    assert _refused(lambda: _read(sqlite_root)).summary.startswith(summary)


def test_optional_tables_may_be_absent(sqlite_root: Path) -> None:
    # Some releases declare no orphandirs (or tombstones) table for a VM namespace.
    _execute(sqlite_root / META_DB, 'DROP TABLE "vms_cloudhypervisor__orphandirs"')
    assert _read(sqlite_root).of(CH).orphan_dirs == ()


def test_a_row_over_the_size_bound_is_refused_before_it_is_read(
    sqlite_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metastore, "MAX_ROW_BYTES", 10)
    error = _refused(lambda: _read(sqlite_root))
    assert "bytes, more than the 10 cocoonplan reads" in error.summary
    assert error.summary.startswith(f"{META_DB}: table vms_cloudhypervisor__records, row ")


# --------------------------------------------------------------------------- the JSON engine's .prev


GOOD = go_json({"vms": {"A": {"id": "A"}}, "names": {"a": "A"}, "orphan_dirs": ["/d"]})
GOOD_TABLES = NamespaceTables(records={"A": {"id": "A"}}, names={"a": "A"}, orphan_dirs=("/d",))


def test_a_decodable_main_file_is_read_and_its_prev_ignored() -> None:
    generation = decode_json_namespace(CH, GOOD, b"garbage")
    assert (generation.tables, generation.source, generation.recovered) == (GOOD_TABLES, VMS_DB, "")


def test_an_absent_main_file_is_empty_whatever_its_prev_holds() -> None:
    assert decode_json_namespace(CH, None, GOOD).tables == NamespaceTables()


@pytest.mark.parametrize(
    "main",
    [b'{"vms":{"A":', b"", GOOD + b"}", b"[]", b'{"vms":[]}', b'{"orphan_dirs":[1]}', b'{"vms":NaN}'],
    ids=["torn", "empty", "trailing-data", "not-an-object", "vms-an-array", "orphan-dir-a-number", "nan"],
)
def test_a_main_file_go_cannot_decode_falls_back_to_its_prev(main: bytes) -> None:
    generation = decode_json_namespace(CH, main, GOOD)
    assert (generation.tables, generation.source) == (GOOD_TABLES, f"{VMS_DB}.prev")
    assert generation.recovered.startswith(f"{VMS_DB} cannot be decoded (")
    assert generation.recovered.endswith(f"read {VMS_DB}.prev instead, as cocoon does")


@pytest.mark.parametrize(("prev", "problem"), [(None, "there is no"), (b"{", "nor can")])
def test_without_a_decodable_prev_an_undecodable_main_file_is_refused(
    prev: bytes | None, problem: str
) -> None:
    error = _refused(lambda: decode_json_namespace(CH, b"{", prev))
    assert error.summary.startswith(f"{VMS_DB}: cannot be decoded (not valid JSON")
    assert f"{problem} {VMS_DB}.prev" in error.summary


@pytest.mark.parametrize(
    ("main", "problem"),
    [(b'{"vms":{},"vms":{}}', "key 'vms' appears twice"), (b'{"vms":{"\xff":{}}}', "not UTF-8 text")],
)
def test_text_go_reads_but_cocoonplan_cannot_is_refused_without_fallback(main: bytes, problem: str) -> None:
    assert problem in _refused(lambda: decode_json_namespace(CH, main, GOOD)).summary


def test_a_root_whose_vms_file_was_torn_is_read_from_its_prev(json_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(json_root, root)
    (root / f"{VMS_DB}.prev").write_bytes((root / VMS_DB).read_bytes())
    (root / VMS_DB).write_bytes((root / VMS_DB).read_bytes()[:100])
    metadata = _read(root)
    assert metadata.tables == _read(json_root).tables
    assert metadata.sources[CH.name] == f"{VMS_DB}.prev"
    (warning,) = metadata.recovered
    assert warning.startswith(f"{VMS_DB} cannot be decoded (not valid JSON")


# --------------------------------------------------------------------------- tombstones


def test_tombstoned_records_and_their_names_are_not_live(json_root: Path, sqlite_root: Path) -> None:
    for root in (json_root, sqlite_root):
        metadata = _read(root)
        vms = live(metadata.of(CH), metadata.sources[CH.name])
        assert sorted(vms.records) == sorted([CLONE_ID, RUN_ID])
        assert vms.names == {"web": CLONE_ID, "worker": RUN_ID}
        assert vms.tombstoned == {GONE_ID: TombstonePhase.DELETING}
        # A leased delete may still roll back, but cocoon refuses the snapshot until it has.
        snapshots = live(metadata.of(SNAPSHOTS), metadata.sources[SNAPSHOTS.name])
        assert (snapshots.records, snapshots.names) == ({}, {})
        assert snapshots.tombstoned == {SNAPSHOT_ID: TombstonePhase.LEASED}


def test_a_tombstone_without_a_record_changes_nothing() -> None:
    tables = NamespaceTables(records={"A": {}}, names={"a": "A"}, tombstones={"B": _tombstone("deleting")})
    result = live(tables, VMS_DB)
    assert (result.records, result.names, result.tombstoned) == ({"A": {}}, {"a": "A"}, {})


@pytest.mark.parametrize(
    ("tombstone", "problem"),
    [
        (_tombstone("gone"), "phase: Input should be 'leased' or 'deleting'"),
        ("A", "the tombstone: Input should be"),
    ],
)
def test_a_tombstone_cocoon_does_not_write_is_refused(tombstone: Any, problem: str) -> None:
    tables = NamespaceTables(records={"A": {}}, tombstones={"A": tombstone})
    error = _refused(lambda: live(tables, META_DB))
    assert error.summary.startswith(f"{META_DB}: tombstone A is not valid: {problem}")
