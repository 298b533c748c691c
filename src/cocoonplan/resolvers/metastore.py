"""cocoon's metadata, read from either of its engines into the same raw tables.

cocoon v0.3.8 keeps its metadata in JSON files (``cloudhypervisor/db/vms.json``, …); later
releases keep it in one SQLite database, ``<root>/meta/meta.db``, and convert legacy roots
with ``cocoon meta convert``. This module reads both into :class:`Metadata`: per namespace,
``{id: JSON value}`` tables exactly as the JSON engine's files hold them, so one node reader
consumes either engine the same way. It only reads; interpreting records is the node
reader's job.

- :func:`read_metadata` reads a node root opened as a :class:`~cocoonplan.nodefs.Tree` (the
  file-system seam: no link followed, every read capped): :func:`meta_files_present` and
  :func:`detect_engine` decide the engine, refusing a root in the middle of a conversion, then
  :func:`read_sqlite_tree` or :func:`read_json_tree` reads it;
- :func:`read_sqlite_bytes`, :func:`decode_json_namespace` (the JSON engine's ``.prev``
  fallback) and :func:`live` (tombstones) are functions of what was read, not of where.

Every failure is a :class:`~cocoonplan.errors.StateError` whose one-line summary names the
file relative to the root (and, for SQLite, the table and row) and whose hint says what to do.

What cocoon does, read from its public source (github.com/cocoonstack/cocoon, file versions
later than v0.3.8; "id" is the stored file id of the research tools, "@" the commit):

- **MetadataEngine.** ``MetaDBPath`` is ``<root>/meta/meta.db``; ``ResolveMetaBackend``: an explicit
  ``meta_backend`` wins, else an existing ``meta.db`` means sqlite, else any legacy JSON file
  means json, else a fresh root gets sqlite (cmd/core/metastore.go @01aad9ff, id
  61560871106). The legacy files (``LegacyJSONPresent``) are :data:`LEGACY_JSON_FILES`.
- **Conversion.** ``cocoon meta convert`` writes the manifest ``meta-convert.manifest``
  beside the database (``ManifestName``, meta/sqlite/store.go @01aad9ff, id 61367106995;
  ``MetaRoot: filepath.Dir(dbPath)``, cmd meta handler id 61369387034); every ordinary open
  of either engine refuses while it exists (``RefuseManifest``). When done it renames each
  source file, ``.prev`` included, aside to ``<file>.converted-<UTC time>`` and removes the
  manifest (meta/convert/convert.go @0e8449de, id 61691003880). So a root holding both
  ``meta.db`` and a legacy file, or the manifest, is mid-conversion.
- **SQLite layout** (meta/sqlite/init.go @01aad9ff, id 61441553737; store.go id 61367106995):
  one transaction creates ``meta_state (namespace TEXT NOT NULL PRIMARY KEY, state TEXT NOT
  NULL, source TEXT, sha256 TEXT, records INTEGER, applied_at TEXT)`` with one row per
  namespace (``state`` ``initialized``, or ``converted`` with source file, sha256 and record
  count after ``MarkConverted``, meta/sqlite/maintenance.go id 61848292645), one table per
  namespace table named ``tableName(ns, tbl)`` = ``"<ns>__<tbl>"`` (quoted identifier) with
  ``(id TEXT NOT NULL PRIMARY KEY, data TEXT NOT NULL)``, and ``PRAGMA application_id =
  0x434F434E`` ("COCN"), ``PRAGMA user_version = 1``. Every connection sets
  ``journal_mode(WAL)``. ``Open`` refuses another application_id, a user_version above 1 and
  a declared namespace without a ``meta_state`` row ("uninitialized").
- **Rows.** ``data`` is the record's ``json.Marshal`` bytes, bound as Go ``[]byte`` (so
  stored as a BLOB despite the TEXT column; both are accepted here). A ``names`` row maps a
  name (``id``) to the record ID as a JSON *string* (``Collection[string]`` in meta/namedtx.go
  id 61559781118 and meta/collection.go id 61693643061; ``verifyNames`` unmarshals it into a
  string, convert.go id 61691003880). An ``orphandirs`` row is the directory as ``id`` and
  ``{}`` as data (hypervisor/metans.go @0b187f6e, id 61385829656).
- **Namespaces and tables** read here (``MetaNamespaces``, id 61560871106):
  ``vms_cloudhypervisor`` and ``vms_firecracker`` (``VMNamespaceName`` = ``"vms_"`` + the
  hypervisor type without ``-``): records, names, orphandirs, tombstones; ``snapshots``
  (snapshot/localfile ``NamespaceName``, id 61710557288): records, names, tombstones;
  ``images_oci`` (images/oci ``NamespaceName``, id 61367585956; ``TableRecords``,
  images/store.go id 61767048681): records, tombstones. Hence the tables
  ``vms_cloudhypervisor__records``, ``__names``, ``__orphandirs``, ``__tombstones`` (likewise
  ``vms_firecracker__*``), ``snapshots__records``, ``snapshots__names``,
  ``snapshots__tombstones``, ``images_oci__records``, ``images_oci__tombstones``. Not read:
  ``images_cloudimg``, ``networks`` (cni) and ``metering__entries``.
- **JSON engine** (meta/json/store.go @01aad9ff, id 61492181057; tables.go id 61752116422):
  the v0.3.8 files, with keys ``vms``/``names``/``orphan_dirs``/``tombstones`` (vms.json),
  ``snapshots``/``names``/``tombstones``, ``images``/``tombstones`` (images/baseconfig.go id
  61540772183). A missing main file is empty (its ``.prev`` is not consulted); one that
  cannot be read fails; one that does not decode (not JSON, trailing data, not an object, a
  table of the wrong type) is replaced by ``<file>.prev`` with a warning, and fails when that
  is missing or does not decode either. Each commit first rotates the old file to ``.prev``.
- **Tombstones** (meta/tombstone/tombstone.go @01aad9ff, id 61615784309): a row keyed by the
  record's ID, ``{"lease_id", "phase": "leased"|"deleting", "leased_at", "payload": {"kind":
  "record"|"orphan", "mode", "cleanup"}}``. GC inserts it ``leased``, flips it to
  ``deleting`` before touching files, then deletes record and tombstone together; recovery
  rolls a ``leased`` one back and a ``deleting`` one forward (docs/design/meta-store.md §5, id
  61781671808). Any tombstone makes cocoon refuse to use the record ("snapshot is being
  deleted", snapshot/localfile/teardown.go id 61537760508), so :func:`live` treats a
  tombstoned record as not live.

UNCONFIRMED, and handled defensively:

- Which tables the newest release declares for a VM namespace: versions of
  cmd/core/metastore.go differ (id 61560871106 has ``orphandirs``, id 61457970302 has not) and
  the newest hypervisor table constants (id 68824316053) name ``records``, ``names`` and a
  new ``placements`` only. So only records and names (and an image namespace's records) are
  required; ``orphandirs`` and ``tombstones`` are read when present; other tables are ignored.
- That the newest ``meta/sqlite/store.go`` keeps the constants and the ``__`` rule above
  (read at @01aad9ff; the meta API changed after it, e.g. ``NewCollection`` without a store
  in hypervisor/placement.go id 68359370970). Another application_id or user_version is
  refused, so a change cannot be misread silently.

Reading SQLite without writing it. SQLite never opens the node's files: ``meta.db`` and
``meta.db-wal`` are read as bytes through the seam, written into a private temporary
directory and opened there with ``mode=ro``, where SQLite replays the WAL and makes its own
``-shm``. Opening them in place cannot be made safe: ``mode=ro`` on a WAL database without a
``-wal`` file creates ``meta.db-wal`` and ``meta.db-shm`` beside it and leaves them (SQLite
3.40, tried), and so it does for a copied root whose WAL came without its ``-shm``;
``immutable=1`` ignores the transactions a live cocoon process still holds in its WAL. The
copy is one committed state: in WAL mode only a checkpoint writes ``meta.db``, so ``meta.db``
is read before and after ``meta.db-wal`` and a difference reads again (at most
:data:`READ_ATTEMPTS` times); frames appended to the WAL meanwhile are whole commits or a torn
tail that SQLite's frame checksums discard. A live cocoon is never locked out.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Collection, Iterator
from contextlib import closing, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from pydantic import Field, ValidationError

from cocoonplan.bounded import InputLimitError, loads, loads_written_by_go
from cocoonplan.cocoon import MetadataEngine
from cocoonplan.errors import StateError
from cocoonplan.model import Model
from cocoonplan.nodefs import Cap, Tree

META_DB = "meta/meta.db"
CONVERT_MANIFEST = "meta/meta-convert.manifest"
APPLICATION_ID = 0x434F434E
"""``PRAGMA application_id`` of cocoon's store: ASCII "COCN"."""
USER_VERSION = 1
"""``PRAGMA user_version``: the only schema generation cocoon has written."""

MAX_ROWS = 100_000
"""Rows a table may have."""
MAX_ROW_BYTES = 1 << 20
"""Bytes one row's ``data`` may have."""
READ_ATTEMPTS = 3
"""Reads of a SQLite store that cocoon keeps checkpointing into before giving up."""
META_WAL = f"{META_DB}-wal"

_RECOPY = "copy the node's root dir again, or run `cocoonplan state export` on the node itself"
_NOT_COCOON = "point at a cocoon root dir; this file is not cocoon's metadata store"
_REPAIR = "cocoon writes this store in transactions; copy it from the node again, or restore it from `cocoon meta backup`"
_CONVERTING = "the root is being converted: run `cocoon meta convert` to completion, then plan again"


class Table(StrEnum):
    """A table of a namespace, by cocoon's table name (the SQLite table is ``<ns>__<table>``)."""

    RECORDS = "records"
    NAMES = "names"
    ORPHAN_DIRS = "orphandirs"
    TOMBSTONES = "tombstones"


# Tables absent from some releases (see the module docstring): missing means empty.
_OPTIONAL_TABLES = frozenset({Table.ORPHAN_DIRS, Table.TOMBSTONES})


class Namespace(Model):
    """One of cocoon's namespaces: its SQLite tables and its JSON engine file."""

    name: str
    """cocoon's namespace name, the prefix of its SQLite tables."""
    file: str
    """The JSON engine's file, relative to the root."""
    records_key: str
    """The JSON key of the records table; the others are fixed (:meth:`key`)."""
    tables: tuple[Table, ...]

    def key(self, table: Table) -> str:
        """The top-level key of ``table`` in the JSON engine's file."""
        return {Table.RECORDS: self.records_key, Table.ORPHAN_DIRS: "orphan_dirs"}.get(table, table.value)

    def sqlite_table(self, table: Table) -> str:
        """cocoon's ``tableName(ns, tbl)``, unquoted."""
        return f"{self.name}__{table.value}"


_VM_TABLES = (Table.RECORDS, Table.NAMES, Table.ORPHAN_DIRS, Table.TOMBSTONES)
VM_NAMESPACES = {
    "cloud-hypervisor": Namespace(
        name="vms_cloudhypervisor", file="cloudhypervisor/db/vms.json", records_key="vms", tables=_VM_TABLES
    ),
    "firecracker": Namespace(
        name="vms_firecracker", file="firecracker/db/vms.json", records_key="vms", tables=_VM_TABLES
    ),
}
"""The VM namespace of each hypervisor type (``VMNamespaceName``)."""
SNAPSHOTS = Namespace(
    name="snapshots",
    file="snapshot/db/snapshots.json",
    records_key="snapshots",
    tables=(Table.RECORDS, Table.NAMES, Table.TOMBSTONES),
)
IMAGES = Namespace(
    name="images_oci",
    file="oci/db/images.json",
    records_key="images",
    tables=(Table.RECORDS, Table.TOMBSTONES),
)
NAMESPACES = (*VM_NAMESPACES.values(), SNAPSHOTS, IMAGES)
"""Every namespace read here, in the order they are read."""
LEGACY_JSON_FILES = (
    *(namespace.file for namespace in NAMESPACES),
    "cloudimg/db/images.json",
    "cni/db/networks.json",
    "metering/log.json",
)
"""Every JSON engine file whose presence makes cocoon pick the json engine."""


class NamespaceTables(Model):
    """One namespace's tables as the JSON engine's file holds them (records by ID, names by
    name, tombstones by record ID: keys sorted), values as JSON parsed them."""

    records: dict[str, Any] = Field(default_factory=dict)
    names: dict[str, Any] = Field(default_factory=dict)
    orphan_dirs: tuple[str, ...] = ()
    """Directories cocoon still has to remove, in cocoon's order."""
    tombstones: dict[str, Any] = Field(default_factory=dict)


class Metadata(Model):
    """Every namespace of :data:`NAMESPACES` as one engine holds it."""

    engine: MetadataEngine | None
    """None: the root holds no metadata yet (cocoon creates it on first use)."""
    tables: dict[str, NamespaceTables]
    """By namespace name."""
    sources: dict[str, str]
    """By namespace name: what the tables were read from, relative to the root, for messages."""
    recovered: tuple[str, ...] = ()
    """One line per JSON file replaced by its ``.prev`` generation, as cocoon does: a warning."""

    def of(self, namespace: Namespace) -> NamespaceTables:
        """The tables of ``namespace``."""
        return self.tables[namespace.name]


def _fail(where: str, problem: str, hint: str) -> NoReturn:
    raise StateError(f"{where}: {problem}", hint=hint)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


class _GoRefusesError(ValueError):
    """JSON text Go's decoder refuses as well: cocoon falls back to ``.prev`` over it."""


def _refuse_constant(name: str) -> NoReturn:
    raise _GoRefusesError(f"{name} is not JSON")


# --------------------------------------------------------------------------- engine


def meta_files_present(tree: Tree) -> frozenset[str]:
    """Which of the files that decide the engine the root ``tree`` holds (whatever their type:
    reading one that is not a regular file fails later, naming it)."""
    candidates = (META_DB, CONVERT_MANIFEST, *LEGACY_JSON_FILES)
    return frozenset(rel for rel in candidates if tree.mode(rel) is not None)


def detect_engine(present: Collection[str]) -> MetadataEngine | None:
    """The engine of a root holding the files ``present`` (relative paths), as cocoon decides
    it with no ``meta_backend`` set; None when it holds no metadata at all.

    A conversion manifest, or ``meta.db`` beside a legacy JSON file, means a conversion in
    progress (cocoon refuses to open such a root): a :class:`StateError`.
    """
    if CONVERT_MANIFEST in present:
        _fail(
            CONVERT_MANIFEST,
            "a metadata conversion is in progress, so cocoon refuses to open the root",
            _CONVERTING,
        )
    legacy = [rel for rel in LEGACY_JSON_FILES if rel in present]
    if META_DB in present and legacy:
        _fail(
            META_DB, f"and {', '.join(legacy)} are both present: both metadata engines hold data", _CONVERTING
        )
    if META_DB in present:
        return MetadataEngine.SQLITE
    return MetadataEngine.JSON if legacy else None


def read_metadata(tree: Tree) -> Metadata:
    """The metadata of the cocoon root ``tree``, from its engine."""
    engine = detect_engine(meta_files_present(tree))
    if engine is MetadataEngine.SQLITE:
        return read_sqlite_tree(tree)
    if engine is MetadataEngine.JSON:
        return read_json_tree(tree)
    return Metadata(
        engine=None,
        tables={namespace.name: NamespaceTables() for namespace in NAMESPACES},
        sources={namespace.name: namespace.file for namespace in NAMESPACES},
    )


# --------------------------------------------------------------------------- JSON engine


class JsonGeneration(Model):
    """The tables of one JSON engine file, from the generation cocoon would read."""

    tables: NamespaceTables
    source: str
    """The file read: the namespace's file or its ``.prev``."""
    recovered: str = ""
    """Why the main file was passed over for ``.prev`` (a warning); empty when it was not."""


def _decode_generation(namespace: Namespace, data: bytes, where: str) -> NamespaceTables | str:
    """The tables of one generation, or why cocoon's decoder refuses it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Go substitutes U+FFFD for invalid bytes instead of refusing: cocoon would read this
        # generation, and cocoonplan cannot read it the same way.
        _fail(where, f"not UTF-8 text: {exc.reason} at byte {exc.start}", _RECOPY)
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                duplicates.append(key)
            out[key] = value
        return out

    try:
        document = loads(text, object_pairs_hook=pairs, parse_constant=_refuse_constant)
    except InputLimitError as exc:
        if isinstance(exc.__cause__, json.JSONDecodeError | _GoRefusesError):
            return str(exc)
        # Too deep, or an integer Python will not convert: Go reads these, so no fallback.
        _fail(where, str(exc), _RECOPY)
    if not isinstance(document, dict):
        return f"the document is {_json_type(document)}, not an object"
    tables: dict[str, Any] = {}
    for table in namespace.tables:
        key = namespace.key(table)
        value = document.get(key)
        if value is None:  # absent, or Go's nil map or slice: nothing recorded
            continue
        if table is Table.ORPHAN_DIRS:
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                return f"{key!r} is not an array of strings"
            tables["orphan_dirs"] = tuple(value)
        elif not isinstance(value, dict):
            return f"{key!r} is {_json_type(value)}, not an object"
        else:
            tables[table.value] = dict(sorted(value.items()))
    if duplicates:
        _fail(where, f"not valid JSON: key {duplicates[0]!r} appears twice in one object", _RECOPY)
    return NamespaceTables.model_validate(tables)


def decode_json_namespace(namespace: Namespace, main: bytes | None, prev: bytes | None) -> JsonGeneration:
    """The tables of ``namespace`` from its JSON engine file's bytes ``main`` and its
    ``.prev`` generation's ``prev`` (None: the file is absent), by cocoon's rule.

    An absent main file is empty (``.prev`` is not consulted); a main file Go's decoder
    refuses (not JSON, trailing data, not an object, a table of the wrong type) is replaced
    by ``.prev``, with the reason in ``recovered``; when ``.prev`` is absent or refused too,
    a :class:`StateError`. Text Go reads but cocoonplan cannot (not UTF-8, too deep, a key
    twice) is a :class:`StateError` without fallback: cocoon would not fall back either.
    """
    if main is None:
        return JsonGeneration(tables=NamespaceTables(), source=namespace.file)
    decoded = _decode_generation(namespace, main, namespace.file)
    if isinstance(decoded, NamespaceTables):
        return JsonGeneration(tables=decoded, source=namespace.file)
    prev_file = f"{namespace.file}.prev"
    if prev is None:
        _fail(namespace.file, f"cannot be decoded ({decoded}) and there is no {prev_file}", _RECOPY)
    fallback = _decode_generation(namespace, prev, prev_file)
    if isinstance(fallback, str):
        _fail(namespace.file, f"cannot be decoded ({decoded}), nor can {prev_file} ({fallback})", _RECOPY)
    return JsonGeneration(
        tables=fallback,
        source=prev_file,
        recovered=f"{namespace.file} cannot be decoded ({decoded}); read {prev_file} instead, as cocoon does",
    )


def read_json_tree(tree: Tree) -> Metadata:
    """The JSON engine's metadata in the root ``tree`` (absent files are empty)."""
    generations = {}
    for namespace in NAMESPACES:
        main = tree.read(namespace.file, Cap.DATABASE)
        # Read only beside a main file: cocoon never consults .prev without one.
        prev = None if main is None else tree.read(f"{namespace.file}.prev", Cap.DATABASE)
        generations[namespace.name] = decode_json_namespace(namespace, main, prev)
    return Metadata(
        engine=MetadataEngine.JSON,
        tables={name: generation.tables for name, generation in generations.items()},
        sources={name: generation.source for name, generation in generations.items()},
        recovered=tuple(g.recovered for g in generations.values() if g.recovered),
    )


# --------------------------------------------------------------------------- SQLite engine


@contextmanager
def _sqlite_errors(what: str, hint: str = _REPAIR) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        problem = "not a SQLite database" if "not a database" in str(exc) else str(exc)
        _fail(META_DB, f"{what}: {problem}" if what else problem, hint)
    except sqlite3.Error as exc:
        _fail(META_DB, f"{what}: {exc}" if what else str(exc), hint)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _rows(connection: sqlite3.Connection, table: str) -> list[tuple[str, Any]]:
    """``(id, parsed data)`` of every row of ``table``, in cocoon's scan order (rowid)."""
    where = f"table {table}"
    with _sqlite_errors(where):
        (count,) = connection.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()
        if count > MAX_ROWS:
            _fail(META_DB, f"{where} has {count} rows, more than the {MAX_ROWS} cocoonplan reads", _REPAIR)
        # Rows over the bound are measured in SQLite and never handed to Python.
        cursor = connection.execute(
            f"SELECT id, typeof(data), length(CAST(data AS BLOB)),"
            f" CASE WHEN length(CAST(data AS BLOB)) <= ? THEN CAST(data AS BLOB) END"
            f" FROM {_quote(table)} ORDER BY rowid",
            (MAX_ROW_BYTES,),
        )
        rows = []
        for row_id, kind, size, data in cursor:
            if not isinstance(row_id, str):
                _fail(META_DB, f"{where}: row ID {row_id!r} is not text", _REPAIR)
            row = f"{where}, row {row_id!r}"
            if kind not in ("text", "blob"):
                _fail(META_DB, f"{row}: data is {kind}, not JSON text", _REPAIR)
            if data is None:
                _fail(
                    META_DB,
                    f"{row}: data is {size} bytes, more than the {MAX_ROW_BYTES} cocoonplan reads",
                    _REPAIR,
                )
            try:
                value = loads_written_by_go(data)
            except InputLimitError as exc:
                _fail(META_DB, f"{row}: {exc}", _REPAIR)
            rows.append((row_id, value))
    return rows


def _check_identity(connection: sqlite3.Connection) -> set[str]:
    """Refuse what cocoon's ``Open`` refuses; the tables the database has."""
    with _sqlite_errors("", _NOT_COCOON):
        (application_id,) = connection.execute("PRAGMA application_id").fetchone()
        (user_version,) = connection.execute("PRAGMA user_version").fetchone()
        tables = {
            name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    if application_id != APPLICATION_ID:
        _fail(
            META_DB,
            f"application_id {application_id:#010x} is not cocoon's {APPLICATION_ID:#010x} ('COCN')",
            f"{_NOT_COCOON} (an empty one is an interrupted `cocoon meta init`: run any cocoon command on the node)",
        )
    if user_version != USER_VERSION:
        _fail(
            META_DB,
            f"user_version {user_version} is a schema generation this cocoonplan does not read (it reads {USER_VERSION})",
            "use a cocoonplan that supports the node's cocoon version",
        )
    if "meta_state" not in tables:
        _fail(META_DB, "table meta_state is missing", _REPAIR)
    with _sqlite_errors("table meta_state"):
        initialized = {name for (name,) in connection.execute("SELECT namespace FROM meta_state")}
    for namespace in NAMESPACES:
        if namespace.name not in initialized:
            _fail(
                META_DB,
                f"table meta_state has no row for namespace {namespace.name}: the namespace is uninitialized",
                "run `cocoon meta init` or finish `cocoon meta convert` on the node, then copy the root again",
            )
    return tables


def _query(db: Path) -> dict[str, NamespaceTables]:
    with _sqlite_errors("cannot be opened", _RECOPY):
        connection = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True)
    with closing(connection):
        with _sqlite_errors(""):
            # The file comes from elsewhere: its schema may hold nothing that runs code.
            connection.execute("PRAGMA trusted_schema = OFF")
            connection.execute("PRAGMA query_only = ON")
        present = _check_identity(connection)
        out = {}
        for namespace in NAMESPACES:
            tables: dict[str, Any] = {}
            for table in namespace.tables:
                name = namespace.sqlite_table(table)
                if name not in present:
                    if table in _OPTIONAL_TABLES:
                        continue
                    _fail(META_DB, f"table {name} is missing", _REPAIR)
                rows = _rows(connection, name)
                if table is Table.ORPHAN_DIRS:
                    tables["orphan_dirs"] = tuple(row_id for row_id, _ in rows)
                else:
                    tables[table.value] = dict(sorted(rows))
            out[namespace.name] = NamespaceTables.model_validate(tables)
        return out


def read_sqlite_bytes(db: bytes, wal: bytes | None) -> dict[str, NamespaceTables]:
    """The tables of every namespace, by name, of the cocoon store whose ``meta.db`` holds
    ``db`` and whose ``meta.db-wal`` holds ``wal`` (None: there is none); opened as a private
    copy (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="cocoonplan-meta-") as private:
        copy = Path(private) / "meta.db"
        try:
            copy.write_bytes(db)
            if wal:
                copy.with_name("meta.db-wal").write_bytes(wal)
        except OSError as exc:
            _fail(
                META_DB,
                f"cannot be copied into {private}: {exc.strerror or exc}",
                "free space in the temporary directory ($TMPDIR), then plan again",
            )
        return _query(copy)


def read_sqlite_tree(tree: Tree) -> Metadata:
    """The SQLite engine's metadata in the root ``tree``: ``meta/meta.db`` with its WAL, one
    committed state of it (see the module docstring)."""
    for _ in range(READ_ATTEMPTS):
        db = tree.read(META_DB, Cap.DATABASE)
        if db is None:
            _fail(META_DB, "does not exist", _RECOPY)
        wal = tree.read(META_WAL, Cap.DATABASE)
        if tree.read(META_DB, Cap.DATABASE) == db:
            return Metadata(
                engine=MetadataEngine.SQLITE,
                tables=read_sqlite_bytes(db, wal),
                sources={namespace.name: META_DB for namespace in NAMESPACES},
            )
    _fail(
        META_DB,
        f"changed while being read, {READ_ATTEMPTS} times",
        "cocoon is checkpointing it: plan again when the node is quieter, or copy the root dir while cocoon is idle",
    )


# --------------------------------------------------------------------------- tombstones


class TombstonePhase(StrEnum):
    """Where cocoon's delete of a record stands."""

    LEASED = "leased"
    """No file was touched yet: recovery rolls the delete back."""
    DELETING = "deleting"
    """Files may be partly gone: recovery rolls the delete forward."""


class _Tombstone(Model):
    model_config = Model.model_config | {"extra": "ignore"}
    phase: TombstonePhase


class LiveTables(Model):
    """A namespace's records and names without its tombstoned records."""

    records: dict[str, Any]
    names: dict[str, Any]
    """Names of tombstoned records removed; every other name kept as recorded."""
    tombstoned: dict[str, TombstonePhase]
    """Record ID → phase of every record being deleted."""


def live(tables: NamespaceTables, where: str) -> LiveTables:
    """``tables`` without the records cocoon is deleting (and their names).

    A tombstoned record is not live in either phase: cocoon refuses to use it until its
    recovery has run, and a ``deleting`` one may have lost its files. A tombstone without a
    record (an orphan's, or a delete that removed the record already) changes nothing.
    ``where`` names the source in errors (:attr:`Metadata.sources`).
    """
    tombstoned = {}
    for record_id, value in tables.tombstones.items():
        try:
            tombstone = _Tombstone.model_validate(value)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "the tombstone"
            _fail(where, f"tombstone {record_id} is not valid: {field}: {error['msg']}", _REPAIR)
        if record_id in tables.records:
            tombstoned[record_id] = tombstone.phase
    return LiveTables(
        records={k: v for k, v in tables.records.items() if k not in tombstoned},
        names={k: v for k, v in tables.names.items() if not (isinstance(v, str) and v in tombstoned)},
        tombstoned=tombstoned,
    )
