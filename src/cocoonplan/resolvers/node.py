"""A node's observed state: its cocoon root directory read into a :class:`NodeState`, or an
exported state document loaded back.

The root may be a copy (rsync, a tarball, ``examples/node``) at any local path, while every
absolute path cocoon recorded in it is a path on the node, under the node's ``--root-dir``.
The reader maps those paths into the copy and keeps them as node paths in the result, so
an exported document never mentions the machine it was made on.

Guarantees:

- The result is deterministic: VMs sorted by name, images by ref, snapshots by ID, blobs by
  hex; reading the same bytes twice gives equal models.
- Nothing is skipped silently. A file that cannot be read, is not UTF-8 or JSON, is a
  directory, or contradicts another file raises :class:`StateError` whose summary names the
  file relative to the root and whose hint says what to do. An absent database is empty:
  cocoon creates each on first use.
- Nothing outside the root is read, and nothing but regular files: every read goes through
  :mod:`cocoonplan.nodefs` (no links followed, each kind of file capped in size), and every
  JSON document through :func:`cocoonplan.bounded.loads`.
- Nothing secret comes out: every string read passes :func:`redact_credentials` first, and
  a run dir's ``config.json`` keeps only the keys of a VmConfig (:data:`VM_CONFIG_KEYS`).
- ``owner`` is set only on VMs that cocoonplan's ownership file names with the same ID
  **and** name; every other VM is foreign and must be left alone.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, Field, ValidationError

from cocoonplan.bounded import InputLimitError, loads_written_by_go
from cocoonplan.cocoon import MetadataEngine, SnapshotMeta
from cocoonplan.defaults import DEFAULT_ROOT_DIR as DEFAULT_ROOT_DIR  # re-exported
from cocoonplan.errors import StateError
from cocoonplan.model import Digest, Model, sha256_digest
from cocoonplan.nodefs import Cap, Listing, Tree, describe
from cocoonplan.observed import (
    OWNERSHIP_FILE,
    STATE_FORMAT_VERSION,
    Building,
    NicAddress,
    NodeState,
    ObservedImage,
    ObservedNic,
    ObservedSnapshot,
    ObservedVM,
    Owner,
    VMSettings,
    redact_credentials,
)
from cocoonplan.resolvers.metastore import (
    IMAGES,
    NAMESPACES,
    SNAPSHOTS,
    VM_NAMESPACES,
    Metadata,
    Namespace,
    live,
    read_metadata,
)

STATE_KIND = "cocoonplan/node-state"
BLOBS_DIR = "oci/blobs"
BOOT_DIR = "oci/boot"
BOOT_FILES = ("vmlinuz", "initrd.img")
OWNERSHIP_FORMAT_VERSION = 1
BACKENDS = (("cloudhypervisor", "cloud-hypervisor"), ("firecracker", "firecracker"))
"""(directory under root and run dir, ``hypervisor`` value) of each VM database cocoon keeps."""

_BLOB_NAME = re.compile(r"^([0-9a-f]{64})\.erofs$")
# cocoon replaces its databases atomically, so a damaged file almost always comes from the copy.
_RECOPY = "copy the node's root dir again, or run `cocoonplan state export` on the node itself"
_REPAIR = (
    "cocoon keeps this file consistent under its lock; restore it from the node, or repair it with cocoon"
)
# ObservedVM fields whose values come from differently named record fields: errors name the record's.
_RECORD_FIELDS = {"settings": "config", "name": "config.name", "nics": "network_configs"}

_M = TypeVar("_M", bound=BaseModel)


def _fail(where: str, problem: str, hint: str, detail: str = "") -> NoReturn:
    raise StateError(f"{where}: {problem}", detail=detail, hint=hint)


def _validation_detail(exc: ValidationError, rename: Mapping[str, str] | None = None) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if loc and rename:
            loc[0] = rename.get(loc[0], loc[0])
        lines.append(f"{'.'.join(loc) or '(document)'}: {error['msg']}")
    return "\n".join(lines)


def _parse_json(data: bytes, where: str, hint: str) -> Any:
    """Strict, bounded JSON (UTF-8, no duplicate keys, no NaN, nesting limited), object key
    order kept, credentials redacted."""
    try:
        document = loads_written_by_go(data)
    except InputLimitError as exc:
        _fail(where, str(exc), hint)
    return redact_credentials(document)


def _object(value: Any, where: str, what: str, hint: str = _REPAIR) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(where, f"{what} is {_json_type(value)}, expected a JSON object", hint)
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _id_set(value: Any, where: str, field: str = "image_blob_ids") -> tuple[str, ...]:
    """One of cocoon's ID sets: a JSON object used as a set, or (other writers) an array."""
    if value is None:
        return ()
    members = list(value) if isinstance(value, dict | list) else None
    if members is None or not all(isinstance(m, str) for m in members):
        _fail(where, f"{field} is not an object or array of strings", _REPAIR)
    return tuple(sorted(set(members)))


@dataclass(frozen=True)
class _Root:
    """A local copy of a node root: maps node paths to local files and reads them strictly."""

    tree: Tree
    root_dir: str
    run_dir: str

    def relative(self, node_path: str, where: str, what: str) -> str:
        """``node_path`` relative to the root dir; a path that cannot be mapped is a StateError."""
        path = PurePosixPath(node_path)
        if not path.is_absolute() or ".." in path.parts:
            _fail(where, f"{what} {node_path!r} is not a clean absolute path", _REPAIR)
        try:
            return path.relative_to(self.root_dir).as_posix()
        except ValueError:
            _fail(
                where,
                f"{what} {node_path} is outside the root dir {self.root_dir}",
                "pass the node's own --root-dir (and --run-dir)",
            )

    def json(self, rel: str, cap: Cap, hint: str = _RECOPY) -> Any:
        """The parsed file, None when absent."""
        data = self.tree.read(rel, cap)
        return None if data is None else _parse_json(data, rel, hint)

    def text(self, rel: str, cap: Cap) -> str | None:
        """The UTF-8 file, credentials redacted; None when absent."""
        data = self.tree.read(rel, cap)
        if data is None:
            return None
        try:
            text: str = redact_credentials(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            _fail(rel, f"not UTF-8 text: {exc.reason} at byte {exc.start}", _RECOPY)
        return text

    def validate(self, model: type[_M], value: Any, where: str, what: str, hint: str = _REPAIR) -> _M:
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            _fail(where, f"{what} is not valid", hint, _validation_detail(exc))


# --------------------------------------------------------------------------- VMs


def _nic(value: Any, where: str, label: str, index: int) -> dict[str, Any]:
    """A NetworkConfig's known keys; ``network`` becomes an address only when it has an IP.

    Checked here, one line naming the record and field: TAP, MAC and address all reach the
    launch line or the guest's kernel cmdline (:class:`ObservedNic`, :class:`NicAddress`)."""
    config = _object(value, where, "a network_configs entry")
    nic = {k: v for k, v in config.items() if k in ObservedNic.model_fields and k != "network"}
    network = config.get("network")
    if network is not None and not isinstance(network, dict):
        _fail(where, f"network_configs network is {_json_type(network)}, expected an object", _REPAIR)
    # cocoon omits empty fields: a DHCP or bridge NIC has no network, or one without an IP.
    if network and network.get("ip"):
        nic["network"] = {k: v for k, v in network.items() if k in NicAddress.model_fields}
    try:
        ObservedNic.model_validate(nic)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        problem = str(error["msg"]).removeprefix("Value error, ")
        _fail(where, f"{label}: network_configs[{index}].{field}: {problem}", _REPAIR)
    return nic


def _record_vm(root: _Root, db: str, hypervisor: str, backend: str, vm_id: str, value: Any) -> ObservedVM:
    """One vms.json record, without its run-dir files and owner."""
    record = _object(value, db, f"VM record {vm_id}")
    missing = [key for key in ("id", "state", "config") if key not in record]
    if missing:
        _fail(db, f"VM record {vm_id} is missing required field(s) {', '.join(missing)}", _REPAIR)
    if record["id"] != vm_id:
        _fail(db, f"VM record ID key {vm_id} holds id {record['id']}", _REPAIR)
    config = _object(record["config"], db, f"VM {vm_id} config")
    if not isinstance(config.get("name"), str):
        _fail(db, f"VM {vm_id} config has no name", _REPAIR)
    label = f"VM {vm_id} ({config['name']})"
    recorded_hypervisor = record.get("hypervisor") or hypervisor
    if recorded_hypervisor != hypervisor:
        _fail(db, f"{label} is a {recorded_hypervisor!r} record in the {hypervisor} database", _REPAIR)
    networks = record.get("network_configs") or []
    if not isinstance(networks, list):
        _fail(db, f"{label}: network_configs is {_json_type(networks)}, expected an array", _REPAIR)
    run_dir = record.get("run_dir") or f"{root.run_dir}/{backend}/{vm_id}"
    fields = {
        "id": vm_id,
        "name": config["name"],
        "state": record["state"],
        "hypervisor": hypervisor,
        # VMConfig gains fields across cocoon versions; the model keeps the ones planning reads.
        "settings": {k: v for k, v in config.items() if k in VMSettings.model_fields},
        "storage_configs": record.get("storage_configs") or (),
        "boot_config": record.get("boot_config"),
        "nics": [_nic(n, db, label, i) for i, n in enumerate(networks)],
        "image_blob_ids": _id_set(record.get("image_blob_ids"), f"{db}: {label}"),
        "snapshot_ids": _id_set(record.get("snapshot_ids"), f"{db}: {label}", "snapshot_ids"),
        "run_dir": run_dir,
    }
    try:
        return ObservedVM.model_validate(fields)
    except ValidationError as exc:
        bad = sorted({_RECORD_FIELDS.get(str(e["loc"][0]), str(e["loc"][0])) for e in exc.errors()})
        _fail(db, f"{label}: {', '.join(bad)} not valid", _REPAIR, _validation_detail(exc, _RECORD_FIELDS))


def _with_run_files(root: _Root, db: str, vm: ObservedVM) -> ObservedVM:
    """Attach ``config.json``, ``cocoon.json`` and ``cmdline`` from the VM's run directory."""
    label = f"VM {vm.id} ({vm.name})"
    rel = root.relative(vm.run_dir, db, f"{label} run_dir")
    if not PurePosixPath(vm.run_dir).is_relative_to(root.run_dir):
        _fail(
            db,
            f"{label} run_dir {vm.run_dir} is not under the run dir {root.run_dir}",
            "pass the node's own --run-dir",
        )
    mode = root.tree.mode(rel)
    if mode is None or not stat.S_ISDIR(mode):
        problem = "is missing" if mode is None else f"is {describe(mode)}, not a directory"
        _fail(rel, f"run directory of {label} {problem}", "copy the node's root dir with its run dir")
    raw_config = root.tree.read(f"{rel}/config.json", Cap.RUN_FILE)
    config = None
    if raw_config is not None:
        where = f"{rel}/config.json"
        config = _object(_parse_json(raw_config, where, _RECOPY), where, "the document", _RECOPY)
    meta = root.json(f"{rel}/cocoon.json", Cap.RUN_FILE)
    # Validated again, not copied: the model keeps only a VmConfig's keys of config.json.
    return ObservedVM.model_validate(
        dict(vm)
        | {
            "runtime_config": config,
            "runtime_config_sha256": None if raw_config is None else sha256_digest(raw_config),
            "runtime_meta": None
            if meta is None
            else root.validate(SnapshotMeta, meta, f"{rel}/cocoon.json", "the snapshot sidecar", _RECOPY),
            "launch": root.text(f"{rel}/cmdline", Cap.CMDLINE),
        }
    )


def _live(meta: Metadata, namespace: Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(where it was read from, live records by ID, names) of one namespace, whichever engine
    holds it; records cocoon is deleting (tombstoned) are not live."""
    where = meta.sources[namespace.name]
    tables = live(meta.of(namespace), where)
    return where, redact_credentials(tables.records), tables.names


def _read_vms(root: _Root, meta: Metadata, backend: str, hypervisor: str) -> list[ObservedVM]:
    """Every VM of one backend's namespace, checked against its ``names`` index."""
    db, records, names = _live(meta, VM_NAMESPACES[hypervisor])
    vms = {key: _record_vm(root, db, hypervisor, backend, key, value) for key, value in records.items()}
    for name, vm_id in names.items():
        if not isinstance(vm_id, str) or vm_id not in vms:
            _fail(db, f"names maps {name} to VM {vm_id} which has no record", _REPAIR)
        if vms[vm_id].name != name:
            _fail(db, f"names maps {name} to VM {vm_id}, whose record is named {vms[vm_id].name}", _REPAIR)
    _check_unique(vms.values(), db)
    for vm in vms.values():
        if vm.name not in names:
            _fail(db, f"VM {vm.id} ({vm.name}) has no entry in names", _REPAIR)
    return [_with_run_files(root, db, vm) for vm in vms.values()]


def _check_unique(vms: Iterable[ObservedVM], where: str) -> None:
    by_name: dict[str, str] = {}
    ids: set[str] = set()
    for vm in vms:
        if vm.id in ids:
            _fail(where, f"two records have the ID {vm.id}", _REPAIR)
        if vm.name in by_name:
            _fail(where, f"two records are named {vm.name} ({by_name[vm.name]}, {vm.id})", _REPAIR)
        ids.add(vm.id)
        by_name[vm.name] = vm.id


class _OwnershipFile(Model):
    """``cocoonplan/owned.json``: ``{"format_version": 1, "vms": {VM_ID: Owner}}``."""

    format_version: int
    vms: dict[str, Owner] = Field(default_factory=dict)
    applied_plan: Digest | None = None
    """The digest of the last plan whose apply was proven on the node."""
    building: dict[str, Building] = Field(default_factory=dict)
    """VM name -> what an apply that has not finished was removing or creating under it."""


def _owners(root: _Root, vms: Iterable[ObservedVM]) -> dict[str, Owner]:
    """cocoonplan's ownership entries by VM ID: those recorded by ID, and for a VM whose ID was
    never recorded, what an interrupted apply was building under its name (cocoon made the
    VM, then apply was killed before it could record the ID cocoon printed)."""
    hint = "restore cocoonplan/owned.json from the node or a backup; cocoonplan writes it on apply"
    document = root.json(OWNERSHIP_FILE, Cap.OWNERSHIP, hint)
    if document is None:
        return {}
    version = _object(document, OWNERSHIP_FILE, "the document", hint).get("format_version")
    if version != OWNERSHIP_FORMAT_VERSION:
        _fail(
            OWNERSHIP_FILE,
            f"format_version {version!r} is not supported (this cocoonplan reads {OWNERSHIP_FORMAT_VERSION})",
            "use the cocoonplan version that applied to this node",
        )
    ownership = root.validate(_OwnershipFile, document, OWNERSHIP_FILE, "the ownership file", hint)
    owners = dict(ownership.vms)
    for vm in vms:
        building = ownership.building.get(vm.name)
        if vm.id not in owners and building is not None and building.id in (None, vm.id):
            owners[vm.id] = building.owner
    return owners


def _owned(vm: ObservedVM, owners: Mapping[str, Owner]) -> ObservedVM:
    owner = owners.get(vm.id)
    # cocoon can reuse nothing by ID, but a VM renamed (or removed and re-recorded by hand)
    # under the same ID is no longer the one cocoonplan created: it is foreign now.
    if owner is None or owner.name != vm.name:
        return vm
    return vm.model_copy(update={"owner": owner})


# --------------------------------------------------------------------------- images, snapshots, blobs


class _ImageLayer(Model):
    model_config = Model.model_config | {"extra": "ignore"}
    digest: str


class _ImageEntry(Model):
    """An images.json entry; ``size`` and ``created_at`` are not part of the observed state."""

    model_config = Model.model_config | {"extra": "ignore"}
    ref: str
    manifest_digest: str
    layers: tuple[_ImageLayer, ...]
    kernel_layer: str | None = None
    initrd_layer: str | None = None


def _read_images(root: _Root, meta: Metadata) -> list[ObservedImage]:
    where, images, _ = _live(meta, IMAGES)
    out = []
    for key, value in images.items():
        entry = root.validate(_ImageEntry, value, where, f"image {key}")
        if entry.ref != key:
            _fail(where, f"image key {key} holds ref {entry.ref}", _REPAIR)
        observed = {
            "ref": key,
            "manifest_digest": entry.manifest_digest,
            "layers": [layer.digest for layer in entry.layers],
            "kernel_layer": entry.kernel_layer or None,
            "initrd_layer": entry.initrd_layer or None,
        }
        out.append(root.validate(ObservedImage, observed, where, f"image {key}"))
    return sorted(out, key=lambda image: image.ref)


def _read_snapshots(root: _Root, meta: Metadata) -> list[ObservedSnapshot]:
    where, records, names = _live(meta, SNAPSHOTS)
    snapshots: dict[str, ObservedSnapshot] = {}
    for key, value in records.items():
        record = _object(value, where, f"snapshot record {key}")
        if record.get("id") != key:
            _fail(where, f"snapshot record ID key {key} holds id {record.get('id')}", _REPAIR)
        fields = {k: v for k, v in record.items() if k in ObservedSnapshot.model_fields}
        fields["image_blob_ids"] = _id_set(record.get("image_blob_ids"), f"{where}: snapshot {key}")
        snapshots[key] = root.validate(ObservedSnapshot, fields, where, f"snapshot {key}")
    for name, snap_id in names.items():
        if not isinstance(snap_id, str) or snap_id not in snapshots:
            _fail(where, f"names maps {name} to snapshot {snap_id} which has no record", _REPAIR)
        if snapshots[snap_id].name != name:
            _fail(
                where,
                f"names maps {name} to snapshot {snap_id}, whose record is named {snapshots[snap_id].name!r}",
                _REPAIR,
            )
    seen: dict[str, str] = {}
    for snap in snapshots.values():
        if snap.name and snap.name in seen:
            _fail(where, f"two records are named {snap.name} ({seen[snap.name]}, {snap.id})", _REPAIR)
        seen[snap.name] = snap.id
    return sorted(snapshots.values(), key=lambda snap: snap.id)


def _entries(root: _Root, rel: str) -> dict[str, int]:
    """The entries of a directory of the root with their modes; none when it is absent."""
    return root.tree.entries(rel, Listing.NODE_DIR) or {}


def _read_blobs(root: _Root) -> list[str]:
    """Hexes of the converted layers; other names (a pull's temp files) are not blobs."""
    found = []
    for name, mode in _entries(root, BLOBS_DIR).items():
        match = _BLOB_NAME.fullmatch(name)
        if match is None:
            continue
        if not stat.S_ISREG(mode):
            # Never opened, but cocoon would attach it as a disk: it is no usable blob.
            _fail(f"{BLOBS_DIR}/{name}", f"is not a regular file but {describe(mode)}", _RECOPY)
        found.append(match.group(1))
    return sorted(found)


def _read_boot_files(root: _Root) -> list[str]:
    """``<hex>/vmlinuz`` and ``<hex>/initrd.img`` extracted under ``oci/boot``, as cocoon's
    ``VerifyBaseFiles`` would find them; other names are not boot files."""
    found = []
    for layer, mode in _entries(root, BOOT_DIR).items():
        if not re.fullmatch(r"[0-9a-f]{64}", layer) or not stat.S_ISDIR(mode):
            continue
        found += [
            f"{layer}/{name}" for name in BOOT_FILES if root.tree.has_file(f"{BOOT_DIR}/{layer}/{name}")
        ]
    return sorted(found)


# --------------------------------------------------------------------------- public API


def _clean_dirs(root_dir: str, run_dir: str | None) -> tuple[str, str]:
    """Normalised (root_dir, run_dir); both must be absolute, run_dir under root_dir."""
    root = PurePosixPath(root_dir)
    if not root.is_absolute() or ".." in root.parts:
        raise StateError(f"root dir {root_dir!r} is not an absolute path", hint="pass the node's --root-dir")
    run = PurePosixPath(run_dir) if run_dir is not None else root / "run"
    if not run.is_absolute() or ".." in run.parts:
        raise StateError(f"run dir {run_dir!r} is not an absolute path", hint="pass the node's --run-dir")
    return root.as_posix(), run.as_posix()


def read_node_root(local: Path, root_dir: str = DEFAULT_ROOT_DIR, run_dir: str | None = None) -> NodeState:
    """Read a cocoon node root found locally at ``local``, recorded under ``root_dir``.

    ``run_dir`` (default ``<root_dir>/run``) must lie under ``root_dir``: run directories
    are read from inside the local copy. See the module docstring for the guarantees.
    """
    root_dir, run_dir = _clean_dirs(root_dir, run_dir)
    if not PurePosixPath(run_dir).is_relative_to(root_dir):
        raise StateError(
            f"run dir {run_dir} is outside the root dir {root_dir}: its run directories cannot be found under {local}",
            hint="read a root whose --run-dir lies under its --root-dir (the default <root-dir>/run)",
        )
    with Tree.open(local, "cocoon root dir", _RECOPY) as tree:
        root = _Root(tree, root_dir, run_dir)
        meta = read_metadata(tree)
        vms = [vm for backend, hypervisor in BACKENDS for vm in _read_vms(root, meta, backend, hypervisor)]
        # Each backend keeps its own names index, yet `cocoon vm` resolves a name across both.
        _check_unique(vms, " and ".join(meta.sources[VM_NAMESPACES[h].name] for _, h in BACKENDS))
        owners = _owners(root, vms)
        return NodeState(
            root_dir=root_dir,
            run_dir=run_dir,
            metadata_engine=meta.engine,
            later_layout=meta.engine is MetadataEngine.JSON and _written_after_v0_3_8(tree),
            recovered=meta.recovered,
            vms=tuple(sorted((_owned(vm, owners) for vm in vms), key=lambda vm: vm.name)),
            images=tuple(_read_images(root, meta)),
            snapshots=tuple(_read_snapshots(root, meta)),
            blobs=tuple(_read_blobs(root)),
            boot_files=tuple(_read_boot_files(root)),
        )


def _written_after_v0_3_8(tree: Tree) -> bool:
    """Whether a JSON-metadata root shows a later cocoon's hand: the ``.prev`` generation every
    later commit rotates out, or per-VM locks under ``locks/vm`` (v0.3.8 has neither)."""
    later = [f"{namespace.file}.prev" for namespace in NAMESPACES] + ["locks/vm"]
    return any(tree.mode(rel) is not None for rel in later)


def _first_problem(document: dict[str, Any], exc: ValidationError) -> str:
    """The first of ``exc``'s errors on one line, naming the VM record it is in by ID and name."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    problem = str(error["msg"]).removeprefix("Value error, ")
    vms = document.get("vms")
    if len(loc) > 2 and loc[0] == "vms" and isinstance(loc[1], int) and isinstance(vms, list):
        vm = vms[loc[1]]
        if isinstance(vm, dict):
            label = f"VM {vm.get('id')} ({vm.get('name')}): "
            return label + f"{'.'.join(str(part) for part in loc[2:])}: {problem}"
    return f"{'.'.join(str(part) for part in loc) or '(document)'}: {problem}"


def load_state_document(path: Path) -> NodeState:
    """Load a document written by :func:`encode_state` (``cocoonplan state export``).

    Other format versions and kinds are refused; the result is checked and ordered like
    :func:`read_node_root`'s.
    """
    where = str(path)
    hint = "export it again with `cocoonplan state export`"
    with Tree.open(path.parent, "directory", hint, label=path.parent) as tree:
        data = tree.read(path.name, Cap.STATE_DOCUMENT)
    if data is None:
        _fail(where, "does not exist", hint)
    document = _object(_parse_json(data, where, hint), where, "the document", hint)
    version = document.get("format_version")
    if version != STATE_FORMAT_VERSION:
        _fail(
            where,
            f"state document format_version {version!r} is not supported (this cocoonplan reads {STATE_FORMAT_VERSION})",
            "export it again with this cocoonplan version",
        )
    if document.get("kind") != STATE_KIND:
        _fail(where, f"kind {document.get('kind')!r} is not {STATE_KIND!r}", hint)
    try:
        state = NodeState.model_validate(document)
    except ValidationError as exc:
        detail = _validation_detail(exc) if exc.error_count() > 1 else ""
        _fail(where, f"not a valid state document: {_first_problem(document, exc)}", hint, detail)
    _check_unique(state.vms, where)
    return state.model_copy(
        update={
            "vms": tuple(sorted(state.vms, key=lambda vm: vm.name)),
            "images": tuple(sorted(state.images, key=lambda image: image.ref)),
            "snapshots": tuple(sorted(state.snapshots, key=lambda snap: snap.id)),
            "blobs": tuple(sorted(state.blobs)),
            "boot_files": tuple(sorted(state.boot_files)),
        }
    )


def read_node_state(path: Path, root_dir: str = DEFAULT_ROOT_DIR, run_dir: str | None = None) -> NodeState:
    """A node's state from ``path``: a root directory (:func:`read_node_root`) or an exported
    document (:func:`load_state_document`), which must have been exported for the same
    root and run dirs."""
    if not path.exists():
        raise StateError(
            f"{path}: does not exist",
            hint="point it at a cocoon root directory or an exported state document",
        )
    if path.is_dir():
        return read_node_root(path, root_dir, run_dir)
    root_dir, run_dir = _clean_dirs(root_dir, run_dir)
    state = load_state_document(path)
    for what, theirs, ours in (("root", state.root_dir, root_dir), ("run", state.run_dir, run_dir)):
        if theirs != ours:
            _fail(
                str(path),
                f"exported for {what} dir {theirs}, but the node's {what} dir is {ours}",
                f"export again with --{what}-dir {ours}, or set the node's {what}Dir in the project file",
            )
    return state


def present_layers(state: NodeState | None) -> frozenset[str]:
    """Hexes of the layers whose EROFS conversion the node holds; no state holds nothing, so
    every blob is then planned for fetching."""
    return frozenset(state.blobs) if state is not None else frozenset()


def encode_state(state: NodeState) -> str:
    """The export text: 2-space indented JSON, keys in model order, trailing newline.

    Equal states give equal text, and :func:`load_state_document` reads it back equal.
    """
    return json.dumps(state.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
