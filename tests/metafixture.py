"""Write cocoon's SQLite metadata store, ``<root>/meta/meta.db``, with Python's ``sqlite3``,
in the layout cocoon's own code gives it, and convert a JSON-engine node root (as
``ocifixture.node_root`` writes it) into one, as ``cocoon meta convert`` does.

The layout (sources in the docstring of ``cocoonplan.resolvers.metastore``): WAL journal;
``PRAGMA application_id = 0x434F434E`` ("COCN") and ``user_version = 1``; ``meta_state``
with one row per namespace; one ``"<ns>__<table>"`` table ``(id TEXT NOT NULL PRIMARY KEY,
data TEXT NOT NULL)`` per namespace table, whose ``data`` is the record's compact JSON bound
as bytes (a BLOB, as Go binds ``[]byte``); a names row's data is the ID as a JSON string.

Nothing here imports cocoonplan: like ``ocifixture``, this is an independent witness. Times
are fixed strings, so the same calls write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ocifixture import go_json

META_DB = "meta/meta.db"
APPLICATION_ID = 0x434F434E
USER_VERSION = 1
APPLIED_AT = "2026-07-21 08:00:00"  # SQLite's datetime('now') format
CONVERTED_AT = "20260721T080000Z"  # the aside suffix's UTC format
METERING_LOG = "metering/log.json"  # a log, not table-shaped: never converted here


@dataclass(frozen=True)
class Namespace:
    """One of ``MetaNamespaces``: its tables and the JSON engine file (key per table) they
    come from."""

    name: str
    file: str
    tables: tuple[tuple[str, str], ...]  # (table, key in the JSON file)


_TOMBSTONES = ("tombstones", "tombstones")
_VM_TABLES = (("records", "vms"), ("names", "names"), ("orphandirs", "orphan_dirs"), _TOMBSTONES)
NAMESPACES = (
    Namespace("vms_cloudhypervisor", "cloudhypervisor/db/vms.json", _VM_TABLES),
    Namespace("vms_firecracker", "firecracker/db/vms.json", _VM_TABLES),
    Namespace(
        "snapshots", "snapshot/db/snapshots.json", (("records", "snapshots"), ("names", "names"), _TOMBSTONES)
    ),
    Namespace("images_oci", "oci/db/images.json", (("records", "images"), _TOMBSTONES)),
    Namespace("images_cloudimg", "cloudimg/db/images.json", (("records", "images"), _TOMBSTONES)),
    Namespace("networks", "cni/db/networks.json", (("records", "networks"), _TOMBSTONES)),
    Namespace("metering", METERING_LOG, (("entries", ""),)),
)
"""``MetaNamespaces`` in cocoon's order (cmd/core/metastore.go)."""

Rows = dict[str, dict[str, bytes]]
"""table -> id -> data, of one namespace."""


def table_name(namespace: str, table: str) -> str:
    """cocoon's ``tableName``: the quoted identifier ``"<ns>__<table>"``."""
    return '"' + f"{namespace}__{table}".replace('"', '""') + '"'


def _connect(db: Path) -> sqlite3.Connection:
    # Autocommit, so transactions are exactly the explicit BEGIN ... COMMIT below; every
    # cocoon connection puts the database in WAL mode.
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    return connection


def init_store(db: Path, *, applied_at: str = APPLIED_AT) -> None:
    """``cocoon meta init``: schema, one ``initialized`` meta_state row per namespace and the
    identity pragmas, in one transaction."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(_connect(db)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "CREATE TABLE meta_state (namespace TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL,"
            " source TEXT, sha256 TEXT, records INTEGER, applied_at TEXT)"
        )
        for namespace in NAMESPACES:
            for table, _ in namespace.tables:
                connection.execute(
                    f"CREATE TABLE {table_name(namespace.name, table)}"
                    " (id TEXT NOT NULL PRIMARY KEY, data TEXT NOT NULL)"
                )
            connection.execute(
                "INSERT INTO meta_state (namespace, state, records, applied_at) VALUES (?, 'initialized', 0, ?)",
                (namespace.name, applied_at),
            )
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {USER_VERSION}")
        connection.execute("COMMIT")


def put_rows(connection: sqlite3.Connection, namespace: str, rows: Rows) -> None:
    """cocoon's ``PutRaw`` for every row (an upsert; data bound as bytes)."""
    for table, by_id in rows.items():
        for row_id, data in by_id.items():
            connection.execute(
                f"INSERT INTO {table_name(namespace, table)} (id, data) VALUES (?, ?)"
                " ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                (row_id, data),
            )


def canonical_digest(namespace: Namespace, rows: Rows) -> tuple[str, int]:
    """cocoon's conversion fingerprint: rows sorted by ID per table, tables in declaration
    order, ``table NUL id NUL data LF`` each; and the number of records."""
    digest = hashlib.sha256()
    for table, _ in namespace.tables:
        for row_id, data in sorted(rows.get(table, {}).items()):
            digest.update(f"{table}\0{row_id}\0".encode() + data + b"\n")
    return digest.hexdigest(), len(rows.get("records", {}))


def json_rows(namespace: Namespace, document: Mapping[str, Any]) -> Rows:
    """The rows the JSON engine reads from ``document`` (a parsed JSON engine file): each
    value re-encoded as Go wrote it (compact), orphan dirs as presence rows ``{}``."""
    rows: Rows = {}
    for table, key in namespace.tables:
        value = document.get(key) or {}
        if table == "orphandirs":
            rows[table] = {directory: b"{}" for directory in value}
        else:
            rows[table] = {row_id: go_json(item) for row_id, item in value.items()}
    return rows


def write_sqlite_meta(
    root: Path, documents: Mapping[str, Mapping[str, Any]], *, applied_at: str = APPLIED_AT
) -> Path:
    """A fresh ``<root>/meta/meta.db`` holding ``documents`` (namespace name -> JSON engine
    document, e.g. ``{"vms": {...}, "names": {...}}``); other namespaces empty."""
    db = root / META_DB
    init_store(db, applied_at=applied_at)
    by_name = {namespace.name: namespace for namespace in NAMESPACES}
    with closing(_connect(db)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        for name, document in documents.items():
            put_rows(connection, name, json_rows(by_name[name], document))
        connection.execute("COMMIT")
    return db


def convert_root(
    root: Path, *, root_dir: str = "/var/lib/cocoon", applied_at: str = APPLIED_AT, aside: str = CONVERTED_AT
) -> Path:
    """``cocoon meta convert`` to sqlite of the JSON-engine root at ``root`` (which stands for
    ``root_dir``): every namespace copied in one transaction, marked ``converted`` with its
    source file, fingerprint and record count, then each source file (and its ``.prev``)
    renamed aside to ``<file>.converted-<aside>``. Returns the database."""
    if (root / METERING_LOG).exists():
        raise ValueError("the metering log is not table-shaped; this fixture does not convert it")
    db = root / META_DB
    init_store(db, applied_at=applied_at)
    with closing(_connect(db)) as connection:
        for namespace in NAMESPACES:
            source = root / namespace.file
            document = json.loads(source.read_bytes()) if source.exists() else {}
            rows = json_rows(namespace, document)
            digest, records = canonical_digest(namespace, rows)
            connection.execute("BEGIN IMMEDIATE")
            put_rows(connection, namespace.name, rows)
            connection.execute(
                "UPDATE meta_state SET state = 'converted', source = ?, sha256 = ?, records = ?, applied_at = ?"
                " WHERE namespace = ?",
                (f"{root_dir}/{namespace.file}", digest, records, applied_at, namespace.name),
            )
            connection.execute("COMMIT")
    for namespace in NAMESPACES:
        for suffix in ("", ".prev"):
            source = root / f"{namespace.file}{suffix}"
            if source.exists():
                source.rename(source.with_name(f"{source.name}.converted-{aside}"))
    return db


@contextmanager
def live_writer(db: Path) -> Iterator[sqlite3.Connection]:
    """A connection to ``db`` as a running cocoon process holds one: WAL and ``-shm`` beside
    the database, and (automatic checkpoints off) what it commits stays in the WAL until it
    closes, when SQLite checkpoints and removes both."""
    with closing(_connect(db)) as connection:
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        yield connection
