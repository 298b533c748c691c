#!/usr/bin/env python3
"""A cocoon emulator: the file effects of the subcommands ``cocoonplan apply`` uses, for two
release lines, v0.3.8 (the default) and v0.6.x (``COCOON_EMULATOR_VERSION=v0.6.4``).

Written from ``shared/reference/cocoon-formats.md`` (§1-§8a, §11: v0.3.8) and
``shared/reference/cocoon-later.md`` (§1-§3: what changed up to v0.6.x) alone, plus cocoon's
public ``meta/sqlite/init.go`` and ``store.go`` for the SQLite constants the reference says to
read there; it imports nothing of cocoonplan, so what it writes is an independent witness of
cocoon's formats. Stdlib only (``sqlite3`` included).

Run it as ``python tests/cocoon_emulator.py ARGS…`` or through a ``cocoon`` shim made by
:func:`install_shim` or by ``python tests/cocoon_emulator.py --write-shim OUT --host-root DIR
--cpus 16 --version v0.6.4`` (``--help`` lists the rest). Flags are parsed strictly like
cobra/pflag, per line (an unknown flag is ``Error: unknown flag: --x``, exit 1). Implemented:

- global ``--root-dir --run-dir --log-dir --config --log-level --cni-conf-dir --cni-bin-dir --dns``;
- ``version`` (five lines, ``Version:`` first);
- ``vm run`` / ``vm create`` IMAGE, ``vm clone``, ``vm start``, ``vm stop``, ``vm rm``,
  ``vm list``, ``vm inspect``;
- ``snapshot import [FILE|-]``, ``snapshot list``, ``snapshot inspect``, ``snapshot rm``;
- v0.6 only: ``image pull [--force] REF…`` (below);
- every other command fails with a message saying it is not emulated.

The v0.6.x line (``cocoon-later.md``), where it differs from v0.3.8:

- **metadata**: the SQLite engine on a fresh root: ``<root>/meta/meta.db`` (WAL), ``meta_state``
  with one ``initialized`` row per namespace, one ``"<ns>__<table>" (id, data)`` table per
  namespace table (``vms_cloudhypervisor``, ``vms_firecracker``, ``snapshots``, ``images_oci``,
  ``images_cloudimg``, ``networks``, ``metering``), ``PRAGMA application_id = 0x434F434E`` and
  ``user_version = 1``, created in one transaction under ``meta/init.lock``; a record's ``data``
  is its compact JSON bound as bytes, a ``names`` row holds the ID as a JSON string. A root
  holding only the legacy JSON files keeps the JSON engine (each commit first copies the old
  file to ``<file>.prev``; an undecodable file is read from ``.prev``); ``COCOON_META_BACKEND``
  (``json``/``sqlite``) overrides the choice; ``meta/meta-convert.manifest`` refuses every open;
- **CLI**: ``vm run``/``create`` add ``--shared-memory --hugepages --mergeable --pci
  --no-watchdog --no-balloon`` and the cgroup flags ``--cpu-weight --cpu-quota-us
  --cpu-period-us --cpu-burst-us --cpuset-cpus``; ``--network`` and ``--bridge`` are mutually
  exclusive; ``vm clone [SNAPSHOT]`` has no ``--cpu/--memory/--storage/--on-demand`` (unknown
  flags) and adds ``--restore-mode copy|ondemand|mmap``, ``--from-dir DIR``, ``--data-disk`` and
  the cgroup flags; ``vm start|stop|rm -o json`` print ``{"succeeded": [IDs]}``;
- **vm run**: ``--cpus max=`` is ``COCOON_EMULATOR_CPUS`` (the online CPU count), hugepages
  only with ``--hugepages``, no ``direct=on`` for a writable qcow2, ``--watchdog`` and
  ``--balloon`` dropped by their flags, ``--vsock cid=3,socket=<run>/vsock.uds`` after the
  balloon, the kernel command line rebuilt with the current DNS at every start, ``cmdline``
  mode 0600; writable disks' ``queue_affinity`` names the CPUs of an 8-CPU cache domain picked
  at every launch (standing for "least loaded": drawn at random, or from ``--cpuset-cpus``)
  and recorded as ``queue_cpus``;
- **records**: ``vsock_socket``, ``net_backend``, ``netns_path``, ``transition_generation``,
  ``last_transition_reason`` and ``last_transition_at`` (create, boot, clone, stop-user), the
  new config keys (``omitzero``); snapshot records gain ``size_bytes`` (the files' apparent
  sizes) and ``last_accessed_at``; a snapshot import checks the envelope's ``files`` list and
  that ``cow.raw`` is exactly ``config.storage`` bytes, and leaves ``<ID>.lease`` beside the
  snapshot directory; per-VM operations flock ``<root>/locks/vm/<ID>.lock``;
- **clone**: resources (CPU, memory, storage, hugepages, shared memory, …) are the snapshot's,
  the COW disk is not grown; ``config.json`` gets disk paths, queue sizes, ``direct`` and
  serial/console as before, plus ``net[i].tap = rm<ID8>-<i>`` and ``vsock.socket`` (when the
  snapshot has a vsock), and no CPU, memory or balloon patch; after the restore the NICs are
  re-added with ``id: cocoon-net-<mac>`` and new ``--data-disk`` files are hot-added; disk
  paths outside the root or run dir, and boot files outside the root, are refused; the name
  defaults to ``cocoon-clone-<ID8>``. ``--restore-mode`` defaults to ``mmap`` (copy for
  hugepage or shared snapshot memory, with a warning when mmap was asked for); ``mmap`` sends
  ``CopyOnWrite``, which the emulated Cloud Hypervisor refuses unless it is cocoonstack's fork
  (``COCOON_EMULATOR_CH=cocoonstack``; default ``upstream``), and the clone is rolled back;
- **image pull REF…**: the emulator reaches no registry. A manifest is read from the OCI image
  layout ``COCOON_EMULATOR_REGISTRY`` names (standing for the registry's manifest endpoint:
  by digest, verified, or by the ``org.opencontainers.image.ref.name`` annotation; an index
  resolves to its ``linux/amd64`` manifest); then, as cocoon does when every layer's
  ``oci/blobs/<hex>.erofs`` and the boot files under ``oci/boot/<hex>/`` are already in place,
  the pull reuses them and commits the ``images_oci`` record (key: the reference as typed).
  A missing manifest or layer fails saying fetching is not emulated (so the erofs-utils ≥ 1.8
  check of a conversion never arises).

What is NOT real: no Cloud Hypervisor runs and no CNI plugin; ``cow.raw`` and data disks are
sparse files of the right size that are **not** formatted (no ``mkfs.ext4``); ``api.sock``
(and v0.6's ``vsock.uds``) are bound-then-closed Unix sockets, ``ch.pid`` names no live
process (so ``vm inspect`` reconciles nothing); REST calls to Cloud Hypervisor are only
written to ``COCOON_EMULATOR_API_LOG`` when set; addresses come from a fake lease pool
(``10.88.0.2``… in ``10.88.0.0/16``, gateway ``10.88.0.1``; a lease is an address no VM record
holds); log directories are recorded, never created; ``--bridge``, ``--fc``, ``--pci`` and
cloud images are refused; ``vm clone --pull`` only warns when the image is absent (cocoon's
pull is best effort too); tombstones and orphan dirs are kept, never acted on. Where the
reference leaves a v0.6 detail UNCONFIRMED (the key order of the new record fields, where
``queue_cpus`` sits, the console PTY file, ``vm list -o json``), the emulator picks one and
cocoonplan must not depend on it.

Environment:
- ``COCOON_EMULATOR_VERSION``: ``v0.3.8`` (default) or ``v0.6.<n>``, what ``version`` prints
  and which line's flags, formats and effects apply; anything else is refused.
- ``COCOON_EMULATOR_CH``: the emulated Cloud Hypervisor build, ``upstream`` (default) or
  ``cocoonstack`` (the fork that accepts ``CopyOnWrite``).
- ``COCOON_EMULATOR_HOST_ROOT=DIR``: DIR stands for ``--root-dir`` (as a ``cocoonplan --root``
  copy does): every absolute path under the root dir is read and written under DIR, while the
  records keep the node's own absolute paths (``/var/lib/cocoon/…``). Unset: paths are real.
- ``COCOON_EMULATOR_REGISTRY``: an OCI image layout standing for the registries' manifests
  (v0.6 ``image pull``).
- ``COCOON_EMULATOR_API_LOG``: a file to which each Cloud Hypervisor REST call a clone would
  make is appended as one JSON line ``{"vm", "endpoint", "body"}``.
- ``COCOON_EMULATOR_SEED``: IDs and MACs drawn from a generator seeded with this value, the
  command line and the databases' bytes (reproducible runs); unset: ``secrets``.
- ``COCOON_EMULATOR_CPUS`` (host CPU count, default ``os.cpu_count()``),
  ``COCOON_EMULATOR_HUGEPAGES=1`` (``nr_hugepages`` > 0, read by v0.3.8 only; default off),
  ``COCOON_EMULATOR_NOW`` (a fixed timestamp for every record).
- ``COCOON_EMULATOR_FAULT``: comma-separated faults a test injects (never cocoon's behaviour):
  ``clone-drop-top-layers:N`` makes ``vm clone`` write a VM without its snapshot's top N layers
  (in its record and its ``config.json``: the layer substitution of cocoon #46);
  ``import-sleep:SECONDS`` makes ``snapshot import`` sleep after extracting its first file (the
  pending record written, the data directory half full), so a test can kill it there.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import secrets
import shlex
import shutil
import socket
import sqlite3
import stat
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, NoReturn

JSON = dict[str, Any]
DEFAULT_VERSION = "v0.3.8"
LATER_RE = re.compile(r"^v0\.6\.\d+$")
MIB = 1 << 20
GIB = 1 << 30
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
DATA_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,19}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SIZE_RE = re.compile(r"^(\d+(\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$")
LEASE_NET, LEASE_GW, LEASE_PREFIX = "10.88", "10.88.0.1", 16
RUNTIME_FILES = ("api.sock", "ch.pid", "console.sock", "cmdline")
LATER_RUNTIME_FILES = (*RUNTIME_FILES, "vsock.uds")
VSOCK_CID = 3
CACHE_DOMAIN = 8
"""CPUs per last-level-cache domain of the emulated host (v0.6 queue placement)."""
RESTORE_MODES = {"copy": None, "ondemand": "OnDemand", "mmap": "CopyOnWrite"}
"""v0.6 ``--restore-mode`` and the ``memory_restore_mode`` each sends (copy sends none)."""


class CocoonError(Exception):
    """A command failure: printed as ``Error: <message>``, exit 1."""


def fail(message: str) -> NoReturn:
    raise CocoonError(message)


def fault(name: str) -> str | None:
    """The argument of the injected fault ``name`` (``COCOON_EMULATOR_FAULT``), None without it."""
    for item in os.environ.get("COCOON_EMULATOR_FAULT", "").split(","):
        key, _, value = item.strip().partition(":")
        if key == name:
            return value
    return None


def emulated_version() -> str:
    """``COCOON_EMULATOR_VERSION``: v0.3.8 (default) or a v0.6.x release."""
    version = os.environ.get("COCOON_EMULATOR_VERSION") or DEFAULT_VERSION
    if version != DEFAULT_VERSION and not LATER_RE.match(version):
        fail(f"emulator: cocoon {version} is not emulated (v0.3.8 or v0.6.x)")
    return version


# --------------------------------------------------------------------------- encoding and time


def go_json(value: Any, *, indent: bool = False) -> str:
    """Go ``json.Marshal`` (or ``MarshalIndent(v, "", "  ")``): order kept, HTML characters escaped."""
    text = json.dumps(value, ensure_ascii=False, indent=2 if indent else None,
                      separators=(",", ": ") if indent else (",", ":"))  # fmt: skip
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escaped)
    return text


def now() -> str:
    """Go's ``time.Now()`` JSON form: RFC 3339, fraction with trailing zeros trimmed, local offset."""
    fixed = os.environ.get("COCOON_EMULATOR_NOW")
    if fixed:
        return fixed
    t = datetime.now().astimezone()
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        text += f".{t.microsecond:06d}".rstrip("0")
    offset = t.strftime("%z")
    return text + ("Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}")


class Random:
    """IDs (§1) and MACs: ``secrets``, or a seeded generator when COCOON_EMULATOR_SEED is set."""

    def __init__(self, context: str) -> None:
        seed = os.environ.get("COCOON_EMULATOR_SEED")
        self._rng = random.Random(f"{seed}\0{context}") if seed is not None else None

    def choice(self, alphabet: str) -> str:
        return self._rng.choice(alphabet) if self._rng else secrets.choice(alphabet)

    def byte(self) -> int:
        return self._rng.randrange(256) if self._rng else secrets.randbelow(256)

    def new_id(self) -> str:
        return "".join(self.choice(BASE32) for _ in range(26))

    def mac(self) -> str:
        raw = [self.byte() for _ in range(6)]
        raw[0] = (raw[0] & 0xFC) | 0x02  # locally administered, unicast
        return ":".join(f"{b:02x}" for b in raw)


def parse_size(text: str) -> int:
    """docker/go-units v0.5.0 ``RAMInBytes``: binary multipliers, case-insensitive unit."""
    match = SIZE_RE.match(text)
    if not match:
        fail(f"invalid size: '{text}'")
    mult = 1 << (10 * "kmgtp".index(match.group(3).lower()) + 10) if match.group(3) else 1
    return int(float(match.group(1)) * mult)


# --------------------------------------------------------------------------- flags (cobra/pflag)

BOOL, STR, INT, LIST = "bool", "string", "int", "stringArray"
GLOBAL_FLAGS = {"config": STR, "root-dir": STR, "run-dir": STR, "log-dir": STR, "log-level": STR,
                "cni-conf-dir": STR, "cni-bin-dir": STR, "dns": STR, "help": BOOL}  # fmt: skip
CREATE_FLAGS = {"fc": BOOL, "name": STR, "cpu": INT, "memory": STR, "storage": STR, "nics": INT,
                "queue-size": INT, "disk-queue-size": INT, "network": STR, "bridge": STR, "user": STR,
                "password": STR, "no-direct-io": BOOL, "windows": BOOL, "data-disk": LIST, "output": STR}  # fmt: skip
CLONE_FLAGS = {"name": STR, "cpu": INT, "memory": STR, "storage": STR, "nics": INT, "queue-size": INT,
               "disk-queue-size": INT, "network": STR, "bridge": STR, "no-direct-io": BOOL,
               "on-demand": BOOL, "pull": BOOL, "output": STR}  # fmt: skip
CGROUP_FLAGS = {"cpu-weight": INT, "cpu-quota-us": INT, "cpu-period-us": INT, "cpu-burst-us": INT,
                "cpuset-cpus": STR}  # fmt: skip
LATER_CREATE_FLAGS = {**CREATE_FLAGS, "shared-memory": BOOL, "hugepages": BOOL, "mergeable": BOOL, "pci": BOOL,
                      "no-watchdog": BOOL, "no-balloon": BOOL, **CGROUP_FLAGS}  # fmt: skip
LATER_CLONE_FLAGS = {**{k: v for k, v in CLONE_FLAGS.items() if k not in ("cpu", "memory", "storage", "on-demand")},
                     "restore-mode": STR, "from-dir": STR, "data-disk": LIST, **CGROUP_FLAGS}  # fmt: skip
"""v0.6 ``vm clone`` (cocoon-later.md §1.2): resizing and ``--on-demand`` are gone, not aliased."""
EXCLUSIVE = (("network", "bridge"),)
"""Flag groups cobra declares mutually exclusive on the v0.6 line."""
SHORTHANDS = {"o": "output", "h": "help"}


class Flags:
    """Parsed flags: values by long name, plus which were given (pflag's ``Changed``)."""

    def __init__(self, spec: Mapping[str, str]) -> None:
        self.spec = {**GLOBAL_FLAGS, **spec}
        self.values: dict[str, Any] = {}

    def given(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def set(self, name: str, value: str | None, shown: str) -> None:
        kind = self.spec[name]
        if kind == BOOL:
            if value is None or value.lower() in ("1", "t", "true"):
                self.values[name] = True
            elif value.lower() in ("0", "f", "false"):
                self.values[name] = False
            else:
                fail(
                    f'invalid argument "{value}" for "{shown}" flag: strconv.ParseBool: parsing "{value}": invalid syntax'
                )
        elif kind == INT:
            assert value is not None
            if not re.fullmatch(r"[+-]?\d+", value):
                fail(
                    f'invalid argument "{value}" for "{shown}" flag: strconv.ParseInt: parsing "{value}": invalid syntax'
                )
            self.values[name] = int(value)
        elif kind == LIST:
            self.values.setdefault(name, []).append(value)
        else:
            self.values[name] = value


def parse_flags(tokens: Sequence[str], spec: Mapping[str, str]) -> tuple[Flags, list[str]]:
    """pflag's interspersed parsing: ``--f v``, ``--f=v``, ``-o v``, ``-ov``, ``--`` ends flags."""
    flags, args = Flags(spec), list[str]()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok == "--":
            args += tokens[i:]
            break
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            if name not in flags.spec:
                fail(f"unknown flag: --{name}")
            shown = "--" + name
        elif tok.startswith("-") and len(tok) > 1:
            short, rest = tok[1], tok[2:]
            if short not in SHORTHANDS or SHORTHANDS[short] not in flags.spec:
                fail(f"unknown shorthand flag: '{short}' in {tok}")
            name, shown = SHORTHANDS[short], f"-{short}, --{SHORTHANDS[short]}"
            eq, value = ("=", rest.removeprefix("=")) if rest else ("", "")
        else:
            args.append(tok)
            continue
        if flags.spec[name] == BOOL:
            flags.set(name, value if eq else None, shown)
        elif eq:
            flags.set(name, value, shown)
        elif i < len(tokens):
            flags.set(name, tokens[i], shown)
            i += 1
        else:
            fail(f"flag needs an argument: {'--' + name if shown.startswith('--') else tok}")
    return flags, args


def exclusive(flags: Flags) -> None:
    """cobra's ``MarkFlagsMutuallyExclusive`` check, run after parsing."""
    for group in EXCLUSIVE:
        given = sorted(name for name in group if flags.given(name))
        if len(given) > 1:
            fail(f"if any flags in the group [{' '.join(group)}] are set none of the others can be; "
                 f"[{' '.join(given)}] were all set")  # fmt: skip


def exact_args(args: Sequence[str], n: int) -> None:
    if len(args) != n:
        fail(f"accepts {n} arg(s), received {len(args)}")


def min_args(args: Sequence[str], n: int) -> None:
    if len(args) < n:
        fail(f"requires at least {n} arg(s), only received {len(args)}")


# --------------------------------------------------------------------------- the node


class Node:
    """A cocoon node's directories (§2); ``host()`` maps a node path to the file it is kept in."""

    def __init__(self, flags: Flags) -> None:
        self.root_dir = os.path.normpath(flags.get("root-dir") or "/var/lib/cocoon")
        self.run_dir = os.path.normpath(flags.get("run-dir") or f"{self.root_dir}/run")
        self.log_dir = os.path.normpath(flags.get("log-dir") or "/var/log/cocoon")
        self.cni_conf_dir = flags.get("cni-conf-dir") or "/etc/cni/net.d"
        dns = flags.get("dns")
        dns = os.environ.get("COCOON_DNS", "8.8.8.8,1.1.1.1") if dns is None else dns
        self.dns = [d.strip() for d in re.split(r"[,;]", dns) if d.strip()]
        for d in self.dns:
            if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", d):
                fail(f"invalid DNS server {d!r}")
        host_root = os.environ.get("COCOON_EMULATOR_HOST_ROOT")
        self.host_root = Path(host_root) if host_root else None
        self.host_cpus = int(os.environ.get("COCOON_EMULATOR_CPUS") or os.cpu_count() or 1)
        self.hugepages = os.environ.get("COCOON_EMULATOR_HUGEPAGES", "") not in ("", "0")
        self.version = emulated_version()
        self.later = self.version != DEFAULT_VERSION
        """The v0.6 line: its flags, metadata engine, launch and clone rules."""
        self.ch_build = os.environ.get("COCOON_EMULATOR_CH") or "upstream"
        if self.ch_build not in ("upstream", "cocoonstack"):
            fail(f"emulator: COCOON_EMULATOR_CH={self.ch_build!r}: want upstream or cocoonstack")
        self._engine: str | None = None

    def host(self, path: str) -> Path:
        if self.host_root is not None and (path == self.root_dir or path.startswith(self.root_dir + "/")):
            return self.host_root / path[len(self.root_dir) :].lstrip("/")
        return Path(path)

    def vm_dir(self, vm_id: str) -> str:
        return f"{self.run_dir}/cloudhypervisor/{vm_id}"

    def rooted(self, rel: str) -> Path:
        """The file of ``<root-dir>/<rel>``."""
        return self.host(f"{self.root_dir}/{rel}")

    def engine(self) -> str:
        """The metadata engine: v0.3.8 has JSON files only; v0.6 resolves it as
        ``ResolveMetaBackend`` does (an explicit backend, else an existing ``meta.db``, else any
        legacy JSON file means json, else a fresh root gets sqlite), refusing a root whose
        conversion is unfinished (``RefuseManifest``)."""
        if self._engine is None:
            if not self.later:
                self._engine = "json"
            else:
                manifest = f"{self.root_dir}/{CONVERT_MANIFEST}"
                if self.host(manifest).exists():
                    fail(
                        f"{manifest} exists: a conversion is in flight, run `cocoon meta convert` to finish it"
                    )
                backend = os.environ.get("COCOON_META_BACKEND", "")
                if backend not in ("", "json", "sqlite"):
                    fail(f"unknown meta backend {backend!r}")
                if backend:
                    self._engine = backend
                elif self.rooted(META_DB).exists():
                    self._engine = "sqlite"
                else:
                    self._engine = "json" if self.legacy_json() else "sqlite"
        return self._engine

    def legacy_json(self) -> bool:
        """``LegacyJSONPresent``: any JSON engine file of a declared namespace exists."""
        return any(self.rooted(ns.file).exists() for ns in NAMESPACES)

    def db(self, ns: Namespace) -> DB:
        return SqliteDB(self, ns) if self.engine() == "sqlite" else DB(self, ns)

    def default_network(self) -> str:
        """The name of the first ``*.conflist`` (by file name) in the CNI conf dir; "" when none."""
        conf = self.host(self.cni_conf_dir)
        names = []
        for file in sorted(conf.glob("*.conflist")) if conf.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(file.read_bytes())
                if isinstance(doc, dict) and isinstance(doc.get("name"), str):
                    names.append(doc["name"])
        return next((n for n in names if n), "")


class Namespace:
    """One of cocoon's metadata namespaces: its SQLite tables (v0.6) and the JSON engine file,
    lock and top-level key of each table (``MetaNamespaces``, ``MetaJSONNamespaces``)."""

    def __init__(self, name: str, file: str, lock: str, tables: Sequence[tuple[str, str]]) -> None:
        self.name, self.file, self.lock, self.tables = name, file, lock, tuple(tables)

    def default(self) -> JSON:
        """The document of an empty namespace: its records and names tables (the optional
        tombstones and orphan dirs are left out, as the JSON codecs omit them when empty)."""
        return {key: {} for table, key in self.tables if table in ("records", "names")}


_VM_TABLES = (
    ("records", "vms"),
    ("names", "names"),
    ("orphandirs", "orphan_dirs"),
    ("tombstones", "tombstones"),
)
VMS = Namespace("vms_cloudhypervisor", "cloudhypervisor/db/vms.json", "vms.lock", _VM_TABLES)
SNAPSHOTS = Namespace(
    "snapshots", "snapshot/db/snapshots.json", "snapshots.lock",
    (("records", "snapshots"), ("names", "names"), ("tombstones", "tombstones")),
)  # fmt: skip
IMAGES = Namespace(
    "images_oci", "oci/db/images.json", "images.lock", (("records", "images"), ("tombstones", "tombstones"))
)
NAMESPACES = (
    VMS,
    Namespace("vms_firecracker", "firecracker/db/vms.json", "vms.lock", _VM_TABLES),
    SNAPSHOTS,
    IMAGES,
    Namespace(
        "images_cloudimg",
        "cloudimg/db/images.json",
        "images.lock",
        (("records", "images"), ("tombstones", "tombstones")),
    ),
    Namespace(
        "networks",
        "cni/db/networks.json",
        "networks.lock",
        (("records", "networks"), ("tombstones", "tombstones")),
    ),
    Namespace("metering", "metering/log.json", "log.lock", (("entries", "entries"),)),
)
"""``MetaNamespaces`` (cmd/core/metastore.go), in cocoon's order."""
META_DB = "meta/meta.db"
CONVERT_MANIFEST = "meta/meta-convert.manifest"
APPLICATION_ID = 0x434F434E
"""``PRAGMA application_id`` of cocoon's store, "COCN" (meta/sqlite/store.go)."""
USER_VERSION = 1


class DB:
    """One cocoon JSON database (§2): flock on the sibling ``*.lock``, whole-file atomic rewrite.
    On the v0.6 line (a legacy root) each commit first keeps the old file as ``<file>.prev``,
    and a file that does not decode is read from ``.prev``."""

    def __init__(self, node: Node, ns: Namespace) -> None:
        self.path = node.rooted(ns.file)
        self.lock_path = self.path.with_name(ns.lock)
        self.ns = ns
        self.later = node.later

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read(self) -> JSON:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self.ns.default()
        try:
            doc = json.loads(data) if data.strip() else self.ns.default()
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            prev = self.path.with_name(self.path.name + ".prev")
            if not self.later or not prev.exists():
                raise
            print(f"WARN {self.path}: {exc}; reading {prev.name}", file=sys.stderr)
            doc = json.loads(prev.read_bytes())
        for key, value in self.ns.default().items():
            if doc.get(key) is None:
                doc[key] = value
        return dict(doc)

    def write(self, doc: JSON) -> None:
        if self.later and self.path.exists():
            atomic_write(self.path.with_name(self.path.name + ".prev"), self.path.read_bytes(), 0o644)
        atomic_write(self.path, (go_json(doc) + "\n").encode(), 0o644)


def quote_ident(name: str) -> str:
    """cocoon's ``quoteIdent``: a double-quoted SQLite identifier."""
    return '"' + name.replace('"', '""') + '"'


def table_name(ns: str, table: str) -> str:
    """cocoon's ``tableName(ns, table)``: ``"<ns>__<table>"``."""
    return quote_ident(f"{ns}__{table}")


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """One connection as cocoon's ``open`` makes it: WAL, a short busy timeout, FULL sync;
    autocommit, so transactions are the explicit BEGIN … COMMIT."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def init_store(node: Node) -> None:
    """``InitIfMissing``: a fresh ``meta.db`` under the transient flock ``meta/init.lock``,
    schema, identity pragmas and one ``initialized`` meta_state row per namespace in one
    transaction (meta/sqlite/init.go). A legacy JSON root is never bootstrapped."""
    db = node.rooted(META_DB)
    if db.exists():
        return
    if node.legacy_json():
        fail(f"no sqlite store at {node.root_dir}/{META_DB}: run `cocoon meta init` or `cocoon meta convert`")
    db.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    with (db.parent / "init.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if db.exists():
            return
        with contextlib.closing(sqlite_connect(db)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "CREATE TABLE meta_state (\n\t\tnamespace TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL,\n"
                "\t\tsource TEXT, sha256 TEXT, records INTEGER, applied_at TEXT)"
            )
            for ns in NAMESPACES:
                for table, _ in ns.tables:
                    connection.execute(
                        f"CREATE TABLE {table_name(ns.name, table)} (id TEXT NOT NULL PRIMARY KEY, data TEXT NOT NULL)"
                    )
                connection.execute(
                    "INSERT INTO meta_state (namespace, state, records, applied_at)"
                    " VALUES (?, 'initialized', 0, datetime('now'))",
                    (ns.name,),
                )
            connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {USER_VERSION}")
            connection.execute("COMMIT")


def open_store(node: Node) -> sqlite3.Connection:
    """``Open`` after ``InitIfMissing``: identity, schema generation and every namespace's
    meta_state row checked, never written."""
    init_store(node)
    path = node.rooted(META_DB)
    connection = sqlite_connect(path)
    try:
        app_id = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            fail(f"{node.root_dir}/{META_DB}: application_id {app_id:#x} is not a cocoon meta store")
        if version > USER_VERSION:
            fail(
                f"{node.root_dir}/{META_DB}: schema version {version} newer than this binary ({USER_VERSION}); upgrade cocoon"
            )
        for ns in NAMESPACES:
            if (
                connection.execute("SELECT state FROM meta_state WHERE namespace = ?", (ns.name,)).fetchone()
                is None
            ):
                fail(
                    f"namespace {ns.name!r} uninitialized (no meta_state row): run `cocoon meta init` or `cocoon meta convert`"
                )
    except BaseException:
        connection.close()
        raise
    return connection


class SqliteDB:
    """One namespace of the v0.6 SQLite store, read and written as the JSON engine's document
    (records and names by key), so every command works on either engine; ``locked()`` is one
    ``BEGIN IMMEDIATE`` transaction, committed when the block ends without an exception."""

    def __init__(self, node: Node, ns: Namespace) -> None:
        self.node, self.ns = node, ns
        self._connection: sqlite3.Connection | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with contextlib.closing(open_store(self.node)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            self._connection = connection
            try:
                yield
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            finally:
                self._connection = None

    def _rows(self, connection: sqlite3.Connection, table: str) -> dict[str, bytes]:
        query = f"SELECT id, data FROM {table_name(self.ns.name, table)} ORDER BY rowid"
        return {row_id: bytes(data) for row_id, data in connection.execute(query)}

    def read(self) -> JSON:
        if self._connection is None:
            with contextlib.closing(open_store(self.node)) as connection:
                return self._read(connection)
        return self._read(self._connection)

    def _read(self, connection: sqlite3.Connection) -> JSON:
        doc = self.ns.default()
        for table, key in self.ns.tables:
            rows = self._rows(connection, table)
            if table == "orphandirs":
                if rows:
                    doc[key] = list(rows)
            elif rows or key in doc:
                doc[key] = {row_id: json.loads(data) for row_id, data in rows.items()}
        return doc

    def write(self, doc: JSON) -> None:
        """Put every changed row and delete every row the document no longer holds (``PutRaw``
        and ``DeleteRaw``: data bound as bytes, as Go binds ``[]byte``)."""
        connection = self._connection
        assert connection is not None, "write only inside locked()"
        for table, key in self.ns.tables:
            value = doc.get(key) or {}
            wanted = (
                {d: b"{}" for d in value}
                if table == "orphandirs"
                else {row_id: go_json(item).encode() for row_id, item in value.items()}
            )
            name = table_name(self.ns.name, table)
            have = self._rows(connection, table)
            for row_id in have.keys() - wanted.keys():
                connection.execute(f"DELETE FROM {name} WHERE id = ?", (row_id,))
            for row_id, data in wanted.items():
                if have.get(row_id) != data:
                    connection.execute(
                        f"INSERT INTO {name} (id, data) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                        (row_id, data),
                    )


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Temp file, fsync, rename (``utils.AtomicWriteJSON``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def vms_db(node: Node) -> DB | SqliteDB:
    return node.db(VMS)


def snapshots_db(node: Node) -> DB | SqliteDB:
    return node.db(SNAPSHOTS)


def images_db(node: Node) -> JSON:
    """The image index (``images.json`` or the ``images_oci`` records), read without a lock."""
    return dict(node.db(IMAGES).read().get("images") or {})


def resolve(records: Mapping[str, JSON], names: Mapping[str, str], arg: str, what: str) -> str:
    """§1: exact ID, exact name, then an ID prefix of at least 3 characters (unique)."""
    if arg in records:
        return arg
    if arg in names and names[arg] in records:
        return names[arg]
    hits = [i for i in records if len(arg) >= 3 and i.startswith(arg)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        fail(f"{what} {arg!r} is ambiguous ({len(hits)} matches)")
    fail(f"{what} {arg!r} not found")


# --------------------------------------------------------------------------- cocoon rules


def reserve_name(db: JSON, name: str) -> None:
    if not NAME_RE.match(name):
        fail(f"invalid VM name {name!r}: must match {NAME_RE.pattern}")
    if name in db["names"]:
        fail(f"VM name {name!r} already exists ({db['names'][name]})")


def validate_config(cfg: JSON) -> None:
    """``VMConfig.Validate`` (§5.1); runs for run, create and clone."""
    if not NAME_RE.match(cfg.get("name", "")):
        fail(f"invalid VM name {cfg.get('name', '')!r}: must match {NAME_RE.pattern}")
    if cfg.get("cpu", 0) <= 0:
        fail("cpu must be at least 1")
    if cfg.get("memory", 0) < 512 * MIB:
        fail("memory must be at least 512M")
    if cfg.get("storage", 0) < 10 * GIB:
        fail("storage must be at least 10G")
    if cfg.get("queue_size", 0) < 0 or cfg.get("disk_queue_size", 0) < 0:
        fail("queue sizes must not be negative")


def validate_storage_configs(scs: Sequence[JSON]) -> None:
    """``ValidateStorageConfigs`` (§4 role rules)."""
    for i, sc in enumerate(scs):
        role, where = sc.get("role"), f"storage_configs[{i}]"
        if not isinstance(sc.get("path"), str) or not sc["path"]:
            fail(f"{where}: empty path")
        if role in ("layer", "cidata", "cow"):
            if sc.get("ro") is not (role != "cow"):
                fail(f"{where}: role {role} must have ro={role != 'cow'}")
            if "direct_io" in sc:
                fail(f"{where}: role {role} does not take direct_io")
        elif role == "data":
            if sc.get("ro") is not False:
                fail(f"{where}: data disk must be writable")
            serial = sc.get("serial", "")
            if not DATA_NAME_RE.match(serial) or serial.startswith("cocoon-"):
                fail(f"{where}: invalid data disk name {serial!r}")
            fstype, mount = sc.get("fstype"), sc.get("mount_point", "")
            if fstype not in ("ext4", "none"):
                fail(f"{where}: fstype must be ext4 or none")
            if fstype == "none" and mount:
                fail(f"{where}: fstype none takes no mount point")
            if mount and (not mount.startswith("/") or "\0" in mount or "\n" in mount):
                fail(f"{where}: invalid mount point {mount!r}")
        else:
            fail(f"{where}: invalid role {role!r}")


def disk_direct(sc: Mapping[str, Any], no_direct_io: bool, later: bool = False) -> bool:
    """O_DIRECT: the disk's override, else writable disks unless ``--no-direct-io``; v0.6's
    ``effectiveDirectIO`` leaves a writable qcow2 overlay without it."""
    if "direct_io" in sc:
        return bool(sc["direct_io"])
    if later and not sc["ro"] and str(sc["path"]).endswith(".qcow2"):
        return False
    return not sc["ro"] and not no_direct_io


def build_cmdline(record: JSON, dns: Sequence[str]) -> str:
    """The guest kernel command line (§5.5)."""
    n = sum(1 for sc in record["storage_configs"] if sc["role"] == "layer")
    name = record["config"]["name"]
    parts = ["console=hvc0 loglevel=3 boot=cocoon-overlay",
             "cocoon.layers=" + ",".join(f"cocoon-layer{j}" for j in reversed(range(n))),
             "cocoon.cow=cocoon-cow", "clocksource=kvm-clock rw"]  # fmt: skip
    nets = record.get("network_configs") or []
    if nets:
        parts.append(f"net.ifnames=0 cocoon.hostname={name}")
    for i, net in enumerate(nets):
        addr = net.get("network") or {}
        if not addr.get("ip"):
            continue
        mask = (0xFFFFFFFF << (32 - int(addr.get("prefix", 0)))) & 0xFFFFFFFF
        netmask = ".".join(str((mask >> s) & 0xFF) for s in (24, 16, 8, 0))
        fields = [f"ip={addr['ip']}", "", addr.get("gateway", ""), netmask, name, f"eth{i}", "off", *dns[:2]]
        parts.append(":".join(fields))
    return " ".join(parts)


def memory_options(node: Node, cfg: Mapping[str, Any]) -> str:
    """``--memory``: hugepages from the host's ``nr_hugepages`` (v0.3.8); on v0.6 hugepages,
    shared and mergeable memory only from their flags."""
    options = f"size={cfg['memory']}"
    if not node.later:
        return options + (",hugepages=on" if node.hugepages else "")
    for key, option in (("shared_memory", "shared"), ("hugepages", "hugepages"), ("mergeable", "mergeable")):
        options += f",{option}=on" if cfg.get(key) else ""
    return options


def place_queues(node: Node, record: JSON) -> list[int]:
    """v0.6: the CPUs of the cache domain a launch places disk queues on, recorded as
    ``queue_cpus``. cocoon picks the least-loaded domain from live host load; the emulator
    draws one (or takes the VM's ``--cpuset-cpus``), so no plan can predict it."""
    cpuset = str(record["config"].get("cpuset_cpus") or "auto")
    if cpuset != "auto":
        cpus = parse_cpuset(cpuset, node.host_cpus)
    else:
        domains = max(1, node.host_cpus // CACHE_DOMAIN)
        first = Random(f"{record['id']}\0{now()}\0queues").byte() % domains * CACHE_DOMAIN
        cpus = list(range(first, min(first + CACHE_DOMAIN, node.host_cpus)))
    record["queue_cpus"] = cpus
    return cpus


def parse_cpuset(text: str, host_cpus: int) -> list[int]:
    """A cgroup cpuset list (``0-3,8``) of this host's CPUs."""
    cpus: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            fail(f'invalid --cpuset-cpus "{text}"')
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if low > high or high >= host_cpus:
            fail(f'invalid --cpuset-cpus "{text}": the host has CPUs 0-{host_cpus - 1}')
        cpus += range(low, high + 1)
    return sorted(set(cpus))


def ch_launch(node: Node, record: JSON) -> str:
    """The ``cmdline`` file of a cold boot (§5.7, and cocoon-later.md §2.6 on v0.6):
    ``cloud-hypervisor`` and its arguments."""
    cfg, vm_dir = record["config"], record["run_dir"]
    cpu, memory, later = cfg["cpu"], cfg["memory"], node.later
    boot = dict(record.get("boot_config") or {})
    if later and boot.get("kernel_path"):
        boot["cmdline"] = build_cmdline(record, node.dns)  # rebuilt with the current DNS every start
    queue_cpus = place_queues(node, record) if later else list(range(cpu))
    cpus = f"boot={cpu},max={node.host_cpus}" + (",kvm_hyperv=on" if cfg.get("windows") else "")
    args = ["cloud-hypervisor", "--api-socket", f"{vm_dir}/api.sock", "--cpus", cpus,
            "--memory", memory_options(node, cfg)]  # fmt: skip
    disks = []
    for sc in record["storage_configs"]:
        qcow2 = sc["path"].endswith(".qcow2")
        opts = [f"path={sc['path']}"] + (["readonly=on"] if sc["ro"] else [])
        opts += ["direct=on"] if disk_direct(sc, bool(cfg.get("no_direct_io")), later) else []
        opts += [] if sc["ro"] or qcow2 else ["sparse=on"]
        opts += ["image_type=qcow2" if qcow2 else "image_type=raw"]
        opts += ["backing_files=on"] if qcow2 and not sc["ro"] else []
        opts += [f"num_queues={cpu}", f"queue_size={cfg.get('disk_queue_size') or 512}"]
        if not sc["ro"] and cpu > 1:
            if later:
                domain = ",".join(map(str, queue_cpus))
                opts.append("queue_affinity=[" + ",".join(f"{i}@[{domain}]" for i in range(cpu)) + "]")
            else:
                opts.append("queue_affinity=[" + ",".join(f"{i}@[{i}]" for i in range(cpu)) + "]")
        disks.append(",".join([*opts, f"serial={sc['serial']}"]))
    if disks:
        args += ["--disk", *disks]
    for flag, key in (("--kernel", "kernel_path"), ("--firmware", "firmware_path"),
                      ("--initramfs", "initrd_path"), ("--cmdline", "cmdline")):  # fmt: skip
        if boot.get(key):
            args += [flag, boot[key]]
    nets = [f"tap={n['tap']},mac={n['mac']},num_queues={n['num_queues']},queue_size={n['queue_size']},"
            "offload_tso=on,offload_ufo=on,offload_csum=on" for n in record.get("network_configs") or []]  # fmt: skip
    if nets:
        args += ["--net", *nets]
    args += ["--rng", "src=/dev/urandom"] + ([] if later and cfg.get("no_watchdog") else ["--watchdog"])
    if memory >= 256 * MIB and not cfg.get("windows") and not (later and cfg.get("no_balloon")):
        args += ["--balloon", f"size={memory // 4},deflate_on_oom=on,free_page_reporting=on"]
    if later:
        args += ["--vsock", f"cid={VSOCK_CID},socket={vm_dir}/vsock.uds"]
    if boot.get("kernel_path"):
        args += ["--serial", "off", "--console", "pty"]
    else:
        args += ["--serial", f"socket={vm_dir}/console.sock", "--console", "off"]
    return " ".join(args)


def lease(db: JSON, taken: set[str]) -> str:
    """The lowest address of the fake pool no VM record (nor this VM) holds."""
    used = set(taken)
    for rec in db["vms"].values():
        for net in rec.get("network_configs") or []:
            used.add((net.get("network") or {}).get("ip", ""))
    for k in range(2, 1 << 16):
        ip = f"{LEASE_NET}.{k >> 8}.{k & 0xFF}"
        if ip not in used and not ip.endswith(".255"):
            return ip
    fail("fake CNI lease pool exhausted")


def network_configs(db: JSON, vm_id: str, nics: int, cpu: int, queue_size: int, rnd: Random) -> list[JSON]:
    """One CNI NetworkConfig per NIC (§4), TAP ``tap<ID8>-<i>`` (§1)."""
    out, taken = list[JSON](), set[str]()
    for i in range(nics):
        ip = lease(db, taken)
        taken.add(ip)
        out.append({"tap": f"tap{vm_id[:8]}-{i}", "mac": rnd.mac(), "num_queues": max(2, 2 * cpu),
                    "queue_size": queue_size or 512, "backend": "cni",
                    "netns_path": f"/var/run/netns/cocoon-{vm_id}",
                    "network": {"ip": ip, "gateway": LEASE_GW, "prefix": LEASE_PREFIX}})  # fmt: skip
    return out


CONFIG_KEYS = ("queue_size", "disk_queue_size", "image", "image_digest", "image_type", "network",
               "no_direct_io", "windows")  # fmt: skip
LATER_CONFIG_KEYS = ("no_watchdog", "no_balloon", "shared_memory", "hugepages", "mergeable", "pci",
                     "cpu_weight", "cpu_quota_us", "cpu_period_us", "cpu_burst_us", "cpuset_cpus")  # fmt: skip
"""``types.Config`` keys v0.6 adds (cocoon-later.md §2.2), ``omitzero``; their place after the
v0.3.8 keys is the emulator's choice."""


def vm_config(name: str, cpu: int, memory: int, storage: int, base: Mapping[str, Any]) -> JSON:
    """A VMConfig (§4): name first, then the ``types.Config`` fields, zero values omitted."""
    cfg: JSON = {"name": name, "cpu": cpu, "memory": memory, "storage": storage}
    for key in (*CONFIG_KEYS, *LATER_CONFIG_KEYS):
        if base.get(key):
            cfg[key] = base[key]
    return cfg


def vm_record(node: Node, vm_id: str, cfg: JSON, nets: list[JSON], scs: list[JSON], boot: JSON,
              blob_ids: Sequence[str], created: str) -> JSON:  # fmt: skip
    """A vms.json record (§4) in cocoon's key order, state ``created``."""
    record: JSON = {"id": vm_id, "hypervisor": "cloud-hypervisor", "state": "created", "config": cfg,
                    "pid": 0, "socket_path": f"{node.vm_dir(vm_id)}/api.sock", "network_configs": nets,
                    "storage_configs": scs, "first_booted": False, "created_at": created,
                    "updated_at": created, "boot_config": boot,
                    "image_blob_ids": {h: {} for h in sorted(set(blob_ids))},
                    "run_dir": node.vm_dir(vm_id), "log_dir": f"{node.log_dir}/cloudhypervisor/{vm_id}"}  # fmt: skip
    if not nets:
        del record["network_configs"]
    if node.later:  # VM-level fields (cocoon-later.md §2.2); NIC 0 keeps its own copies
        record["vsock_socket"] = f"{node.vm_dir(vm_id)}/vsock.uds"
        if nets:
            record |= {"net_backend": "cni", "netns_path": nets[0]["netns_path"]}
    return record


def ordered(record: JSON) -> JSON:
    """Record keys in struct order after ``started_at``/``stopped_at`` changes (v0.6's new
    fields where the emulator puts them: their order is not known)."""
    order = ["id", "hypervisor", "state", "config", "pid", "socket_path", "vsock_socket", "net_backend",
             "netns_path", "network_configs", "storage_configs", "first_booted", "snapshot_ids",
             "created_at", "updated_at", "started_at", "stopped_at", "transition_generation",
             "last_transition_reason", "last_transition_at", "queue_cpus", "boot_config",
             "image_blob_ids", "run_dir", "log_dir"]  # fmt: skip
    return {k: record[k] for k in order if k in record} | {k: v for k, v in record.items() if k not in order}


def transition(node: Node, record: JSON, reason: str) -> None:
    """v0.6: every state transition bumps ``transition_generation`` and records why and when."""
    if node.later:
        record["transition_generation"] = int(record.get("transition_generation") or 0) + 1
        record |= {"last_transition_reason": reason, "last_transition_at": now()}


@contextlib.contextmanager
def vm_lock(node: Node, vm_id: str) -> Iterator[None]:
    """v0.6's per-VM operations lock, ``<root>/locks/vm/<ID>.lock`` (``lock/vmlock``)."""
    if not node.later:
        yield
        return
    path = node.rooted(f"locks/vm/{vm_id}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def api_call(node: Node, vm_id: str, endpoint: str, body: JSON | None = None) -> None:
    """A REST call cocoon would make to the VM's Cloud Hypervisor, appended to
    ``COCOON_EMULATOR_API_LOG`` when it is set (no VMM runs)."""
    log = os.environ.get("COCOON_EMULATOR_API_LOG")
    if log:
        with Path(log).open("a") as out:
            out.write(json.dumps({"vm": vm_id, "endpoint": endpoint, "body": body}) + "\n")


def launch(node: Node, record: JSON, cmdline: str) -> None:
    """The runtime side of a start: ``cmdline``, ``ch.pid``, ``api.sock``; record ``running``."""
    vm_dir = node.host(record["run_dir"])
    vm_dir.mkdir(parents=True, exist_ok=True)
    pid = 10000 + int(hashlib.sha256(f"{record['id']}{now()}".encode()).hexdigest()[:4], 16)
    (vm_dir / "cmdline").write_bytes(cmdline.encode())
    if node.later:
        (vm_dir / "cmdline").chmod(0o600)
    (vm_dir / "ch.pid").write_bytes(str(pid).encode())
    for name in ("api.sock", "vsock.uds") if node.later else ("api.sock",):
        placeholder_socket(vm_dir / name)
    stamp = now()
    record |= {"state": "running", "pid": pid, "first_booted": True, "updated_at": stamp, "started_at": stamp}
    record.pop("stopped_at", None)


def placeholder_socket(path: Path) -> None:
    """A bound-then-closed Unix socket (a plain file where the path is too long to bind)."""
    path.unlink(missing_ok=True)
    if len(str(path)) < 100:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    else:
        path.touch()


def stop_runtime(node: Node, record: JSON) -> None:
    for name in LATER_RUNTIME_FILES if node.later else RUNTIME_FILES:
        node.host(f"{record['run_dir']}/{name}").unlink(missing_ok=True)


def sparse_file(path: Path, size: int) -> None:
    """A sparse file of ``size`` bytes, mode 0600, nothing written (cocoon then runs mkfs.ext4;
    the emulator does not)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def verify_base_files(node: Node, scs: Sequence[JSON], boot: Mapping[str, str]) -> None:
    """``VerifyBaseFiles``: stat every layer, the kernel, the initrd and the firmware."""
    checks = [("base layer", sc["path"]) for sc in scs if sc["role"] == "layer"]
    checks += [(what, boot[key]) for what, key in (("kernel", "kernel_path"), ("initrd", "initrd_path"),
                                                   ("firmware", "firmware_path")) if boot.get(key)]  # fmt: skip
    for what, path in checks:
        try:
            node.host(path).stat()
        except OSError as exc:
            fail(f"verify base files: {what} {path}: stat {path}: {(exc.strerror or str(exc)).lower()}")


def sanitize_vm_name(image: str) -> str:
    """``sanitizeVMName`` (§1): cocoon-<repository path without host or library/>[-tag]."""
    ref = image.split("@", 1)[0]
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        ref = rest
    repo, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    repo = repo.removeprefix("library/").replace("/", "-")
    name = f"cocoon-{repo}" + (f"-{tag}" if tag and tag != "latest" else "")
    return name[:63]


def parse_data_disks(specs: Sequence[str]) -> list[JSON]:
    """``--data-disk size=..,name=..,fstype=..,mount=..,directio=..`` (§5.3 step 4)."""
    disks: list[JSON] = []
    for spec in specs:
        fields: dict[str, str] = {}
        for part in spec.split(","):
            key, eq, value = part.partition("=")
            if not eq or key not in ("size", "name", "fstype", "mount", "directio") or key in fields:
                fail(f"invalid --data-disk {spec!r}: bad field {part!r}")
            fields[key] = value
        if "size" not in fields:
            fail(f"invalid --data-disk {spec!r}: size= is required")
        size = parse_size(fields["size"])
        if size < 16 * MIB:
            fail(f"invalid --data-disk {spec!r}: size must be at least 16M")
        fstype = fields.get("fstype", "ext4") or "ext4"
        if fstype not in ("ext4", "none"):
            fail(f"invalid --data-disk {spec!r}: fstype must be ext4 or none")
        directio = fields.get("directio", "auto")
        if directio not in ("on", "off", "auto"):
            fail(f"invalid --data-disk {spec!r}: directio must be on, off or auto")
        disks.append({"name": fields.get("name"), "size": size, "fstype": fstype,
                      "mount": fields.get("mount"), "directio": directio})  # fmt: skip
    taken = {d["name"] for d in disks if d["name"]}
    counter = 0
    for d in disks:
        while not d["name"]:
            counter += 1
            d["name"] = f"data{counter}" if f"data{counter}" not in taken else None
        if not DATA_NAME_RE.match(d["name"]) or d["name"].startswith("cocoon-"):
            fail(f"invalid data disk name {d['name']!r}")
        if d["mount"] is None:
            d["mount"] = "" if d["fstype"] == "none" else f"/mnt/{d['name']}"
    names = [d["name"] for d in disks]
    if len(set(names)) != len(names):
        fail("duplicate data disk names")
    return disks


# --------------------------------------------------------------------------- vm commands


def print_json(value: Any) -> None:
    sys.stdout.write(go_json(value, indent=True) + "\n")


def lookup_image(node: Node, image: str) -> JSON:
    """The image index entry ``vm run IMAGE`` uses (§3.7): the exact key, else the exact manifest
    digest; v0.6's ``LookupOne`` also takes a digest prefix (12 hex digits or more, ``sha256:``
    optional) when every match names the same manifest."""
    images = images_db(node)
    entry = images.get(image) or next((e for e in images.values() if e.get("manifest_digest") == image), None)
    hexpart = image.removeprefix("sha256:")
    if entry is None and node.later and len(hexpart) >= 12 and re.fullmatch(r"[0-9a-f]+", hexpart):
        matches = [
            e for e in images.values() if str(e.get("manifest_digest", "")).startswith(f"sha256:{hexpart}")
        ]
        if matches and len({e["manifest_digest"] for e in matches}) == 1:
            entry = matches[0]
    if entry is None:
        fail(f"image {image} not found: pull it first")
    return entry


def later_settings(node: Node, flags: Flags) -> JSON:
    """The v0.6 ``types.Config`` keys from their flags: cgroup controls (a snapshot's are never
    inherited) and, for ``vm run``/``create``, the memory and device switches."""
    if not node.later:
        return {}
    cpuset = flags.get("cpuset-cpus")
    if cpuset is not None and cpuset != "auto":
        parse_cpuset(cpuset, node.host_cpus)
    settings = {"cpu_weight": flags.get("cpu-weight"), "cpu_quota_us": flags.get("cpu-quota-us"),
                "cpu_period_us": flags.get("cpu-period-us"), "cpu_burst_us": flags.get("cpu-burst-us"),
                "cpuset_cpus": cpuset}  # fmt: skip
    for flag in ("no-watchdog", "no-balloon", "shared-memory", "hugepages", "mergeable"):
        settings[flag.replace("-", "_")] = flags.get(flag)
    return {k: v for k, v in settings.items() if v}


def data_disk_configs(vm_dir: str, data_disks: Sequence[JSON]) -> list[JSON]:
    """The storage configs of new ``--data-disk`` files in the run dir (§4)."""
    scs = []
    for d in data_disks:
        sc: JSON = {
            "path": f"{vm_dir}/data-{d['name']}.raw",
            "ro": False,
            "serial": d["name"],
            "role": "data",
        }
        if d["mount"]:
            sc["mount_point"] = d["mount"]
        sc["fstype"] = d["fstype"]
        if d["directio"] != "auto":
            sc["direct_io"] = d["directio"] == "on"
        scs.append(sc)
    return scs


def vm_create(node: Node, flags: Flags, args: list[str], start: bool) -> None:
    exact_args(args, 1)
    image = args[0]
    if flags.get("fc"):
        fail("emulator: --fc (Firecracker) is not emulated")
    if node.later:
        exclusive(flags)
        if flags.get("pci"):
            fail("emulator: --pci (Firecracker only) is not emulated")
    if flags.get("bridge"):
        fail("emulator: --bridge is not emulated")
    user, password = flags.get("user", "root"), flags.get("password", "cocoon")
    if not USER_RE.match(user):
        fail(f"invalid --user {user!r}")
    if set(password) & set("`\\$;&(){}<>!|"):
        fail("invalid --password: shell metacharacters are not allowed")
    name = flags.get("name") or sanitize_vm_name(image)
    cpu, nics = flags.get("cpu", 2), flags.get("nics", 1)
    memory, storage = parse_size(flags.get("memory", "1G")), parse_size(flags.get("storage", "10G"))
    if nics < 0:
        fail("nics must not be negative")
    data_disks = parse_data_disks(flags.get("data-disk", []))
    entry = lookup_image(node, image)
    base = {"queue_size": flags.get("queue-size", 0), "disk_queue_size": flags.get("disk-queue-size", 0),
            "image": image, "image_digest": entry["manifest_digest"], "image_type": "oci",
            "network": flags.get("network") or (node.default_network() if nics else ""),
            "no_direct_io": flags.get("no-direct-io", False), "windows": flags.get("windows", False),
            **later_settings(node, flags)}  # fmt: skip
    cfg = vm_config(name, cpu, memory, storage, base)
    validate_config(cfg)
    if cpu > node.host_cpus:
        fail(f"cpu {cpu} exceeds the host's {node.host_cpus} CPUs")
    layers = [layer["digest"].removeprefix("sha256:") for layer in entry.get("layers") or []]
    kernel_hex = str(entry.get("kernel_layer", "")).removeprefix("sha256:")
    initrd_hex = str(entry.get("initrd_layer", "")).removeprefix("sha256:")
    scs: list[JSON] = [{"path": f"{node.root_dir}/oci/blobs/{h}.erofs", "ro": True,
                        "serial": f"cocoon-layer{j}", "role": "layer"} for j, h in enumerate(layers)]  # fmt: skip
    boot = {"kernel_path": f"{node.root_dir}/oci/boot/{kernel_hex}/vmlinuz",
            "initrd_path": f"{node.root_dir}/oci/boot/{initrd_hex}/initrd.img"}  # fmt: skip
    verify_base_files(node, scs, boot)
    db = vms_db(node)
    with db.locked():
        doc = db.read()
        rnd = Random(f"{sys.argv[1:]}\0{go_json(doc)}")
        vm_id = rnd.new_id()
        reserve_name(doc, name)
        vm_dir = node.vm_dir(vm_id)
        scs.append({"path": f"{vm_dir}/cow.raw", "ro": False, "serial": "cocoon-cow", "role": "cow"})
        scs += data_disk_configs(vm_dir, data_disks)
        validate_storage_configs(scs)
        nets = network_configs(doc, vm_id, nics, cpu, cfg.get("queue_size", 0), rnd)
        record = vm_record(node, vm_id, cfg, nets, scs, boot, [*layers, kernel_hex, initrd_hex], now())
        boot["cmdline"] = build_cmdline(record, node.dns)
        transition(node, record, "create")
        host_dir = node.host(vm_dir)
        host_dir.mkdir(parents=True)
        try:
            with vm_lock(node, vm_id):
                sparse_file(host_dir / "cow.raw", storage)
                for d in data_disks:
                    sparse_file(host_dir / f"data-{d['name']}.raw", d["size"])
                if start:
                    launch(node, record, ch_launch(node, record))
                    transition(node, record, "boot")
                record = ordered(record)
                doc["vms"][vm_id] = record
                doc["names"][name] = vm_id
                db.write(doc)
        except BaseException:
            shutil.rmtree(host_dir, ignore_errors=True)
            raise
    print_json(record) if flags.get("output") == "json" else print(
        f"VM {name} ({vm_id}) {'running' if start else 'created'}"
    )


SNAPSHOT_SETTINGS = ("hugepages", "shared_memory", "mergeable", "pci", "no_watchdog", "no_balloon")
"""v0.6: what a clone takes from its snapshot besides CPU, memory, storage and windows."""


def clone_source(node: Node, flags: Flags, args: Sequence[str]) -> tuple[JSON, Path]:
    """The snapshot a clone restores (§8.1): its record and the directory of its files; on v0.6
    ``--from-dir DIR`` instead, any directory holding a ``snapshot.json`` (§3)."""
    directory = flags.get("from-dir") if node.later else None
    if directory:
        host_dir = node.host(directory)
        try:
            envelope = json.loads((host_dir / "snapshot.json").read_bytes())
        except (OSError, ValueError) as exc:
            fail(f"--from-dir {directory}: snapshot.json: {exc}")
        what = f"--from-dir {directory}"
        config = envelope_config(envelope, what)
        verify_snapshot_files(envelope, config, host_dir, what)
        return snapshot_record(config, "", config.get("name") or "", None, directory), host_dir
    sdb = snapshots_db(node)
    with sdb.locked():
        sdoc = sdb.read()
    snap = sdoc["snapshots"][resolve(sdoc["snapshots"], sdoc["names"], args[0], "snapshot")]
    if snap.get("pending"):
        fail(f"snapshot {snap['id']} is still being written (pending)")
    return snap, node.host(snap.get("data_dir") or f"{node.root_dir}/snapshot/localfile/{snap['id']}")


def restore_mode(node: Node, flags: Flags, src: Path) -> str | None:
    """The ``memory_restore_mode`` the restore sends: v0.3.8 ``OnDemand`` with ``--on-demand``;
    v0.6 ``--restore-mode`` (default ``mmap``), except that hugepage-backed or shared snapshot
    memory is always copied (a warning when mmap was asked for; PRs #158, #159, #163)."""
    if not node.later:
        return "OnDemand" if flags.get("on-demand") else None
    asked = flags.get("restore-mode")
    if asked is not None and asked not in RESTORE_MODES:
        fail(f'invalid --restore-mode "{asked}": want copy, ondemand or mmap')
    try:
        memory = json.loads((src / "config.json").read_bytes()).get("memory") or {}
    except (OSError, ValueError, AttributeError):
        memory = {}
    if isinstance(memory, dict) and (memory.get("hugepages") or memory.get("shared")):
        if asked == "mmap":
            print(
                "WARN restore mode mmap does not apply to hugepage or shared memory: copying", file=sys.stderr
            )
        return None
    return RESTORE_MODES[asked or "mmap"]


def vm_clone(node: Node, flags: Flags, args: list[str]) -> None:
    if node.later:
        exclusive(flags)
        if len(args) > 1:
            fail(f"accepts at most 1 arg(s), received {len(args)}")
        if bool(args) == bool(flags.get("from-dir")):
            fail(
                "give either SNAPSHOT or --from-dir, not both"
                if args
                else "give a SNAPSHOT or --from-dir DIR"
            )
    else:
        exact_args(args, 1)
    if flags.get("bridge"):
        fail("emulator: --bridge is not emulated")
    snap, src = clone_source(node, flags, args)
    if snap.get("hypervisor") == "firecracker":
        fail("emulator: Firecracker snapshots are not emulated")
    inherited = ("image", "image_digest", "image_type", "windows", "network", "queue_size", "disk_queue_size",
                 "no_direct_io", *(SNAPSHOT_SETTINGS if node.later else ()))  # fmt: skip
    base = {k: snap.get(k) for k in inherited}
    for flag, key in (
        ("network", "network"),
        ("queue-size", "queue_size"),
        ("disk-queue-size", "disk_queue_size"),
    ):
        if flags.get(flag):
            base[key] = flags.get(flag)
    if flags.given("no-direct-io"):
        base["no_direct_io"] = flags.get("no-direct-io")
    base |= later_settings(node, flags)
    values = {"cpu": snap.get("cpu", 0), "memory": snap.get("memory", 0), "storage": snap.get("storage", 0),
              "nics": snap.get("nics", 0)}  # fmt: skip
    for key in values:
        if not flags.given(key):
            continue
        given = flags.get(key)
        given = parse_size(given) if key in ("memory", "storage") else given
        if node.later:  # --nics only: the NICs are swapped after the restore
            if given < 0:
                fail("nics must not be negative")
        elif given < values[key]:
            fail(f"--{key} {flags.get(key)} is below the snapshot's {values[key]}")
        values[key] = given
    nics = values["nics"]
    if not base.get("network") and nics:
        base["network"] = node.default_network()
    mode = restore_mode(node, flags, src)
    data_disks = parse_data_disks(flags.get("data-disk", [])) if node.later else []
    name = flags.get("name", "")
    cfg = vm_config(name, values["cpu"], values["memory"], values["storage"], base)
    if name or not node.later:  # v0.6 names an unnamed clone after its ID, then validates
        validate_config(cfg)
    if cfg["cpu"] > node.host_cpus:
        fail(f"cpu {cfg['cpu']} exceeds the host's {node.host_cpus} CPUs")
    if flags.get("pull"):
        images = images_db(node)
        lookup = snap.get("image_digest") or snap.get("image")
        if lookup not in images and not any(e.get("manifest_digest") == lookup for e in images.values()):
            print(f"WARN emulator: --pull cannot pull {lookup}; continuing", file=sys.stderr)
    db = vms_db(node)
    with db.locked():
        doc = db.read()
        rnd = Random(f"{sys.argv[1:]}\0{go_json(doc)}")
        vm_id = rnd.new_id()
        if not name and node.later:
            cfg["name"] = f"cocoon-clone-{vm_id[:8]}"
            validate_config(cfg)
        reserve_name(doc, cfg["name"])
        vm_dir = node.vm_dir(vm_id)
        host_dir = node.host(vm_dir)
        host_dir.mkdir(parents=True)
        try:
            with vm_lock(node, vm_id):
                record = clone_files(node, src, host_dir, vm_dir, cfg, base, vm_id, data_disks)
                nets = network_configs(doc, vm_id, nics, cfg["cpu"], cfg.get("queue_size", 0), rnd)
                record = vm_record(node, vm_id, cfg, nets, record["storage_configs"], record["boot_config"],
                                   list(snap.get("image_blob_ids") or {}), now())  # fmt: skip
                record["boot_config"]["cmdline"] = build_cmdline(record, node.dns)
                launch(node, record, f"cloud-hypervisor --api-socket {vm_dir}/api.sock")
                restore(node, record, src, mode, len(data_disks))
                transition(node, record, "clone")
                record = ordered(record)
                doc["vms"][vm_id] = record
                doc["names"][cfg["name"]] = vm_id
                db.write(doc)
        except BaseException:
            discard_vm(node, vm_id, host_dir)
            raise
    print_json(record) if flags.get("output") == "json" else print(f"VM {cfg['name']} ({vm_id}) cloned")


def discard_vm(node: Node, vm_id: str, host_dir: Path) -> None:
    """Remove a VM's run dir (and v0.6's lock file): a failed create, or ``vm rm``."""
    shutil.rmtree(host_dir, ignore_errors=True)
    if node.later:
        node.rooted(f"locks/vm/{vm_id}.lock").unlink(missing_ok=True)


def restore(node: Node, record: JSON, src: Path, mode: str | None, new_disks: int) -> None:
    """§8.7 (and cocoon-later.md §3): ``vm.restore`` of the run dir, each snapshot NIC removed
    and the clone's added (v0.6 names them ``cocoon-net-<mac>``), v0.6's new data disks
    hot-added, ``vm.resume``. A stock Cloud Hypervisor refuses ``CopyOnWrite``."""
    vm_id, cfg = record["id"], record["config"]
    body: JSON = {"source_url": f"file://{record['run_dir']}"}
    if mode:
        body["memory_restore_mode"] = mode
    api_call(node, vm_id, "vm.restore", body)
    if mode == "CopyOnWrite" and node.ch_build == "upstream":
        fail('restore: vm.restore: Cloud Hypervisor refused memory_restore_mode "CopyOnWrite" '
             "(a stock build: only cocoonstack's fork has it): use --restore-mode copy")  # fmt: skip
    snapshot_nets = json.loads((src / "config.json").read_bytes()).get("net") or []
    for net in snapshot_nets:
        if isinstance(net, dict) and net.get("id"):
            api_call(node, vm_id, "vm.remove-device", {"id": net["id"]})
    for net in record.get("network_configs") or []:
        device = {"id": "cocoon-net-" + net["mac"].replace(":", "")} if node.later else {}
        api_call(node, vm_id, "vm.add-net", device | {
            "tap": net["tap"], "mac": net["mac"], "num_queues": net["num_queues"], "queue_size": net["queue_size"],
            "offload_tso": True, "offload_ufo": True, "offload_csum": True})  # fmt: skip
    for sc in record["storage_configs"][len(record["storage_configs"]) - new_disks :] if new_disks else ():
        api_call(node, vm_id, "vm.add-disk", {"path": sc["path"], "readonly": False, "image_type": "Raw",
                                              "num_queues": cfg["cpu"], "serial": sc["serial"],
                                              "queue_size": cfg.get("disk_queue_size") or 512})  # fmt: skip
    api_call(node, vm_id, "vm.resume")


def check_meta_paths(node: Node, scs: Sequence[JSON], meta: JSON) -> None:
    """v0.6 ``LoadAndValidateMeta``: disks only under the root or run dir, kernel and initrd
    only under the root dir."""

    def under(path: str, *dirs: str) -> bool:
        return any(path == d or path.startswith(d + "/") for d in dirs)

    for sc in scs:
        if not under(sc["path"], node.root_dir, node.run_dir):
            fail(f"snapshot cocoon.json: disk {sc['path']} is outside the root and run dirs")
    boot = meta.get("boot_config") or {}
    for key in ("kernel_path", "initrd_path"):
        if boot.get(key) and not under(boot[key], node.root_dir):
            fail(f"snapshot cocoon.json: {key} {boot[key]} is outside the root dir")


def clone_files(node: Node, src: Path, dst: Path, vm_dir: str, cfg: JSON, base: JSON, vm_id: str,
                data_disks: Sequence[JSON] = ()) -> JSON:  # fmt: skip
    """§8.3-§8.6: copy, check, rewrite disk paths, verify base files, grow (v0.3.8), patch;
    v0.6 also creates the new ``--data-disk`` files, hot-added after the restore."""
    try:
        ch = json.loads((src / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        fail(f"snapshot config.json: {exc}")
    disks = ch.get("disks") or []
    writable = {PurePosixPath(d.get("path", "")).name for d in disks if not d.get("readonly")}
    for entry in sorted(src.iterdir()):
        if not entry.is_file() or entry.is_symlink() or entry.name == "snapshot.json":
            continue
        target = dst / entry.name
        if entry.name.startswith("memory-range"):
            try:
                os.link(entry, target)
            except OSError:
                target.symlink_to(entry)
        elif entry.name in writable:
            sparse_copy(entry, target)
        else:
            shutil.copy2(entry, target)
    try:
        meta = json.loads((dst / "cocoon.json").read_bytes())
    except (OSError, ValueError) as exc:
        fail(f"snapshot cocoon.json: {exc}")
    scs: list[JSON] = [dict(sc) for sc in meta.get("storage_configs") or []]
    validate_storage_configs(scs)
    if node.later:
        check_meta_paths(node, scs, meta)
    for sc in scs:  # §8.4 (2)
        name = f"data-{sc['serial']}.raw" if sc["role"] == "data" else PurePosixPath(sc["path"]).name
        if sc["role"] != "layer" and not (dst / name).is_file():
            fail(f"snapshot integrity: {name} missing")
    if len(scs) != len(disks):
        fail(f"snapshot integrity: cocoon.json has {len(scs)} disks, config.json {len(disks)}")
    for i, (sc, disk) in enumerate(zip(scs, disks, strict=True)):
        if sc["path"] != disk.get("path") or sc["ro"] != bool(disk.get("readonly")):
            fail(f"snapshot integrity: disk {i} differs between cocoon.json and config.json")
    if not (dst / "state.json").is_file() or not any(
        p.name.startswith("memory-range") for p in dst.iterdir()
    ):
        fail("snapshot integrity: state.json or memory-ranges missing")
    if not any(sc["role"] == "cow" for sc in scs):
        fail("snapshot has no cow disk")
    moves: dict[str, str] = {}
    for sc in scs:  # §8.5
        new = {"cow": f"{vm_dir}/{PurePosixPath(sc['path']).name}", "data": f"{vm_dir}/data-{sc['serial']}.raw",
               "cidata": f"{vm_dir}/cidata.img"}.get(sc["role"])  # fmt: skip
        if new is not None and new != sc["path"]:
            moves[sc["path"]] = new
            sc["path"] = new
    dropped = int(fault("clone-drop-top-layers") or 0)
    if dropped:  # injected: the clone runs fewer layers than its snapshot (cocoon #46)
        gone = {sc["path"] for sc in [sc for sc in scs if sc["role"] == "layer"][-dropped:]}
        scs = [sc for sc in scs if sc["path"] not in gone]
        ch["disks"] = [d for d in disks if d.get("path") not in gone]
    payload = ch.get("payload") or {}
    boot = {k: payload[p] for k, p in (("kernel_path", "kernel"), ("initrd_path", "initramfs"),
                                       ("cmdline", "cmdline"), ("firmware_path", "firmware")) if payload.get(p)}  # fmt: skip
    verify_base_files(node, scs, boot)
    for sc in scs if not node.later else ():  # v0.6 no longer grows the COW disk at clone
        if sc["role"] == "cow" and sc["path"].endswith(".raw"):
            cow = node.host(sc["path"])
            if cow.stat().st_size < cfg["storage"]:
                os.truncate(cow, cfg["storage"])
    direct_boot = bool(payload.get("kernel"))
    patched = patch_config(node, ch, scs, cfg, base, vm_dir, direct_boot, vm_id)
    atomic_write(dst / "config.json", go_json(patched).encode(), 0o600)
    state = json.loads((dst / "state.json").read_bytes())
    if moves:
        atomic_write(dst / "state.json", go_json(replace_paths(state, moves)).encode(), 0o600)
    taken = {sc["serial"] for sc in scs}
    for d in data_disks:  # v0.6 --data-disk: new files beside the copied ones
        if d["name"] in taken:
            fail(f"data disk name {d['name']!r} is already a disk of the snapshot")
        sparse_file(dst / f"data-{d['name']}.raw", d["size"])
    scs += data_disk_configs(vm_dir, data_disks)
    validate_storage_configs(scs)
    return {"id": vm_id, "storage_configs": scs, "boot_config": boot}


def patch_config(node: Node, ch: JSON, scs: Sequence[JSON], cfg: JSON, base: JSON, vm_dir: str,
                 direct_boot: bool, vm_id: str) -> JSON:  # fmt: skip
    """``patchCHConfig`` (§8.6, §6.4): only the listed fields; top level and decoded maps sorted.
    v0.3.8 also sets boot vCPUs, memory size and the balloon; v0.6 instead points each NIC at
    a throwaway TAP ``rm<ID8>-<i>`` and ``vsock.socket`` at the clone's (cocoon-later.md §3)."""
    if len(ch.get("disks") or []) != len(scs):
        fail("patch config.json: disk count differs from the storage list")
    memory, no_direct = cfg["memory"], bool(base.get("no_direct_io"))
    ch["disks"] = [
        dict(
            sorted(
                (
                    disk
                    | {
                        "path": sc["path"],
                        "queue_size": base.get("disk_queue_size") or 512,
                        "direct": disk_direct(sc, no_direct, node.later),
                    }
                ).items()
            )
        )
        for disk, sc in zip(ch["disks"], scs, strict=True)
    ]
    if direct_boot:
        ch["serial"], ch["console"] = {"mode": "Off"}, {"mode": "Pty"}
    else:
        ch["serial"], ch["console"] = {"mode": "Socket", "socket": f"{vm_dir}/console.sock"}, {"mode": "Off"}
    if node.later:
        if isinstance(ch.get("net"), list):
            ch["net"] = [
                dict(sorted((net | {"tap": f"rm{vm_id[:8]}-{i}"}).items())) if isinstance(net, dict) else net
                for i, net in enumerate(ch["net"])
            ]
        if isinstance(ch.get("vsock"), dict):
            ch["vsock"] = dict(sorted((ch["vsock"] | {"socket": f"{vm_dir}/vsock.uds"}).items()))
        return dict(sorted(ch.items()))
    if isinstance(ch.get("cpus"), dict):
        ch["cpus"] = dict(sorted((ch["cpus"] | {"boot_vcpus": cfg["cpu"]}).items()))
    ch["memory"] = dict(sorted(((ch.get("memory") or {}) | {"size": memory}).items()))
    if base.get("windows") or memory < 256 * MIB:
        ch.pop("balloon", None)
    elif isinstance(ch.get("balloon"), dict):
        ch["balloon"] = dict(sorted((ch["balloon"] | {"size": memory // 4}).items()))
    else:
        ch["balloon"] = {"size": memory // 4, "deflate_on_oom": True, "free_page_reporting": True}
    return dict(sorted(ch.items()))


def replace_paths(value: Any, moves: Mapping[str, str], key: str = "") -> Any:
    """``patchStateJSON``: exact old paths under ``path``/``disk_path`` keys; every object sorted."""
    if isinstance(value, dict):
        return {k: replace_paths(v, moves, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [replace_paths(v, moves) for v in value]
    if key in ("path", "disk_path") and isinstance(value, str):
        return moves.get(value, value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1 << 53:
        return int(float(value))  # Go decodes numbers into float64
    return value


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy keeping holes (``SEEK_DATA``/``SEEK_HOLE``), mode 0666 minus the umask."""
    size = src.stat().st_size
    with src.open("rb") as fin, dst.open("wb") as fout:
        offset = 0
        while offset < size:
            try:
                data_at = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            hole_at = os.lseek(fin.fileno(), data_at, os.SEEK_HOLE)
            fin.seek(data_at)
            fout.seek(data_at)
            remaining = hole_at - data_at
            while remaining:
                chunk = fin.read(min(remaining, 1 << 20))
                fout.write(chunk)
                remaining -= len(chunk)
            offset = hole_at
        fout.truncate(size)


def vm_each(node: Node, flags: Flags, args: list[str], action: Callable[[JSON, JSON], str]) -> None:
    """One lifecycle verb on each VM named, under the database lock (and v0.6's per-VM lock);
    ``action`` says what it did. v0.6's ``-o json`` prints ``{"succeeded": [IDs]}`` instead."""
    min_args(args, 1)
    db = vms_db(node)
    done, said = [], []
    with db.locked():
        doc = db.read()
        for arg in args:
            record = doc["vms"][resolve(doc["vms"], doc["names"], arg, "VM")]
            with vm_lock(node, record["id"]):
                said.append(action(doc, record))
            done.append(record["id"])
        db.write(doc)
    if flags.get("output") == "json":
        print_json({"succeeded": done})
    elif any(said):
        print("\n".join(line for line in said if line))


def vm_start(node: Node, flags: Flags, args: list[str]) -> None:
    def start(doc: JSON, record: JSON) -> str:
        if record["state"] == "running":
            return ""
        boot = record.get("boot_config") or {}
        verify_base_files(node, record["storage_configs"], boot)
        launch(node, record, ch_launch(node, record))
        transition(node, record, "boot")
        doc["vms"][record["id"]] = ordered(record)
        return f"started {record['config']['name']} ({record['id']})"

    vm_each(node, flags, args, start)


def vm_stop(node: Node, flags: Flags, args: list[str]) -> None:
    def stop(doc: JSON, record: JSON) -> str:
        stop_runtime(node, record)
        if record["state"] != "stopped":
            stamp = now()
            record |= {"state": "stopped", "pid": 0, "updated_at": stamp, "stopped_at": stamp}
            transition(node, record, "stop-user")
        doc["vms"][record["id"]] = ordered(record)
        return f"stopped {record['config']['name']} ({record['id']})"

    vm_each(node, flags, args, stop)


def vm_rm(node: Node, flags: Flags, args: list[str]) -> None:
    def remove(doc: JSON, record: JSON) -> str:
        if record["state"] == "running" and not flags.get("force"):
            fail(f"VM {record['config']['name']} ({record['id']}) is running: stop it first or use --force")
        stop_runtime(node, record)
        discard_vm(node, record["id"], node.host(record["run_dir"]))
        del doc["vms"][record["id"]]
        if doc["names"].get(record["config"]["name"]) == record["id"]:
            del doc["names"][record["config"]["name"]]
        return f"removed {record['config']['name']} ({record['id']})"

    vm_each(node, flags, args, remove)


def vm_list(node: Node, flags: Flags, args: list[str]) -> None:
    exact_args(args, 0)
    db = vms_db(node)
    with db.locked():
        doc = db.read()
    records = sorted(doc["vms"].values(), key=lambda r: (r.get("created_at", ""), r["id"]))
    if flags.get("output") == "json":
        print_json(records)
    else:
        for r in records:
            print(f"{r['id']}\t{r['config']['name']}\t{r['state']}")


def vm_inspect(node: Node, flags: Flags, args: list[str]) -> None:
    exact_args(args, 1)
    db = vms_db(node)
    with db.locked():
        doc = db.read()
    print_json(doc["vms"][resolve(doc["vms"], doc["names"], args[0], "VM")])


# --------------------------------------------------------------------------- snapshots


def snapshot_import(node: Node, flags: Flags, args: list[str]) -> None:
    if len(args) > 1:
        fail(f"accepts at most 1 arg(s), received {len(args)}")
    source = args[0] if args and args[0] != "-" else None
    try:
        raw: IO[bytes] = Path(source).open("rb") if source else sys.stdin.buffer  # noqa: SIM115
    except OSError as exc:
        fail(f"import: open {source}: {exc.strerror}")
    with contextlib.ExitStack() as stack:
        if source:
            stack.enter_context(raw)
        buffered = io.BufferedReader(raw)  # type: ignore[type-var]
        stream: IO[bytes] = buffered
        if buffered.peek(2)[:2] == b"\x1f\x8b":
            unzipped = gzip.GzipFile(fileobj=buffered, mode="rb")
            stack.callback(unzipped.close)
            stream = unzipped  # type: ignore[assignment]
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
        members = iter(tar)
        first = next(members, None)
        if first is None or first.name.lstrip("./") != "snapshot.json" or not first.isreg():
            fail("import: the archive's first entry must be snapshot.json")
        envelope_file = tar.extractfile(first)
        assert envelope_file is not None
        try:
            envelope = json.loads(envelope_file.read())
        except ValueError as exc:
            fail(f"import: snapshot.json: {exc}")
        config = envelope_config(envelope, "import")
        name = flags.get("name") or config.get("name") or ""
        db = snapshots_db(node)
        with db.locked():
            doc = db.read()
            if name and name in doc["names"]:
                fail(f"snapshot name {name!r} already exists ({doc['names'][name]})")
            snap_id = Random(f"{sys.argv[1:]}\0{go_json(doc)}").new_id()
            data_dir = f"{node.root_dir}/snapshot/localfile/{snap_id}"
            record = snapshot_record(config, snap_id, name, flags.get("description") or config.get("description"),
                                     data_dir, later=node.later)  # fmt: skip
            doc["snapshots"][snap_id] = record | {"pending": True, "data_dir": data_dir}
            if name:
                doc["names"][name] = snap_id
            db.write(doc)
        host_dir = node.host(data_dir)
        try:
            host_dir.mkdir(parents=True)
            pause = fault("import-sleep")
            for member in members:
                extract_member(tar, member, host_dir)
                if pause:  # injected: a slow extract a test kills midway
                    time.sleep(float(pause))
                    pause = None
            if node.later:
                verify_snapshot_files(envelope, config, host_dir, "import")
                record["size_bytes"] = sum(f.stat().st_size for f in host_dir.iterdir() if f.is_file())
        except BaseException as exc:
            shutil.rmtree(host_dir, ignore_errors=True)
            with db.locked():
                doc = db.read()
                doc["snapshots"].pop(snap_id, None)
                if doc["names"].get(name) == snap_id:
                    del doc["names"][name]
                db.write(doc)
            if isinstance(exc, tarfile.TarError | OSError | ValueError):
                fail(f"import: {exc}")
            raise
        with db.locked():
            doc = db.read()
            doc["snapshots"][snap_id] = record
            db.write(doc)
        if node.later:  # the flock file a clone or gc leases the snapshot with
            node.host(f"{data_dir}.lease").touch()
    print(snap_id)


def envelope_config(envelope: Any, what: str) -> JSON:
    """The ``config`` of a ``snapshot.json`` envelope of version 1 (§6.7)."""
    if not isinstance(envelope, dict) or envelope.get("version") != 1:
        version = envelope.get("version") if isinstance(envelope, dict) else None
        fail(f"{what}: unsupported snapshot.json version {version!r} (want 1)")
    config = envelope.get("config")
    if not isinstance(config, dict):
        fail(f"{what}: snapshot.json has no config")
    return config


def verify_snapshot_files(envelope: JSON, config: JSON, directory: Path, what: str) -> None:
    """v0.6 ``VerifyManifest`` (every file the envelope's ``files`` lists is there) and
    ``VerifyCOWSize`` (``cow.raw`` is exactly ``config.storage`` bytes: a tar unpacked by a
    tool that drops the sparse records is refused)."""
    files = envelope.get("files")
    if isinstance(files, list):
        missing = [f for f in files if not (directory / str(f)).is_file()]
        if missing:
            fail(f"{what}: snapshot.json lists {', '.join(map(str, missing))}, which is missing")
    cow = directory / "cow.raw"
    if cow.is_file() and config.get("storage") and cow.stat().st_size != config["storage"]:
        fail(f"{what}: cow.raw is {cow.stat().st_size} bytes, config.storage is {config['storage']}")


def snapshot_record(config: JSON, snap_id: str, name: str, description: str | None, data_dir: str,
                    *, later: bool = False) -> JSON:  # fmt: skip
    """A snapshots.json record (§6.6), struct key order, ``omitempty`` except name and created_at;
    v0.6 adds the new ``types.Config`` keys it embeds and ``last_accessed_at`` (``size_bytes``
    once the files are in place)."""
    record: JSON = {}
    for key in ("cpu", "memory", "storage", "queue_size", "disk_queue_size", "image", "image_digest",
                "image_type", "network", "no_direct_io", "windows", *(LATER_CONFIG_KEYS if later else ())):  # fmt: skip
        if config.get(key):
            record[key] = config[key]
    record |= {"id": snap_id, "name": name}
    if description:
        record["description"] = description
    blob_ids = config.get("image_blob_ids")
    if blob_ids:
        record["image_blob_ids"] = {h: {} for h in sorted(blob_ids)}
    for key in ("hypervisor", "nics"):
        if config.get(key):
            record[key] = config[key]
    stamp = now()
    return (
        record | {"created_at": stamp, "data_dir": data_dir} | ({"last_accessed_at": stamp} if later else {})
    )


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """``utils.ExtractTar``: regular files only, flat names; holes kept (§6.2, §6.5)."""
    name = member.name.removeprefix("./")
    if member.isdir() and name in ("", "."):
        return
    if not member.isreg() or not name or "/" in name or name in (".", ".."):
        fail(f"import: refusing tar entry {member.name!r}")
    data = tar.extractfile(member)
    assert data is not None
    mode = member.mode & 0o7777 & ~current_umask()
    fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        sparse_map, sparse_size = (
            member.pax_headers.get("COCOON.sparse.map"),
            member.pax_headers.get("COCOON.sparse.size"),
        )
        if sparse_map is not None or sparse_size is not None:
            size = int(sparse_size or "")
            segments = json.loads(sparse_map or "[]")
            if sum(s["l"] for s in segments) != member.size:
                fail(
                    f"import: {name}: sparse map covers {sum(s['l'] for s in segments)} bytes, entry has {member.size}"
                )
            end = 0
            for seg in segments:
                off, length = int(seg["o"]), int(seg["l"])
                if off < end or length < 0 or off + length > size:
                    fail(f"import: {name}: bad sparse segment {seg}")
                out.seek(off)
                copy_exact(data, out, length)
                end = off + length
        else:
            size = member.size
            while block := data.read(4096):
                if block.count(0) == len(block):
                    out.seek(len(block), os.SEEK_CUR)
                else:
                    out.write(block)
        out.truncate(size)


def copy_exact(src: IO[bytes], dst: IO[bytes], length: int) -> None:
    while length:
        chunk = src.read(min(length, 1 << 20))
        if not chunk:
            fail("import: tar entry shorter than its sparse map")
        dst.write(chunk)
        length -= len(chunk)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def snapshot_list(node: Node, flags: Flags, args: list[str]) -> None:
    db = snapshots_db(node)
    with db.locked():
        doc = db.read()
    records = sorted(doc["snapshots"].values(), key=lambda r: (r.get("created_at", ""), r["id"]))
    if flags.get("output") == "json":
        print_json(records)
    else:
        for r in records:
            print(f"{r['id']}\t{r.get('name', '')}\t{r.get('image', '')}")


def snapshot_inspect(node: Node, flags: Flags, args: list[str]) -> None:
    exact_args(args, 1)
    db = snapshots_db(node)
    with db.locked():
        doc = db.read()
    print_json(doc["snapshots"][resolve(doc["snapshots"], doc["names"], args[0], "snapshot")])


def snapshot_rm(node: Node, flags: Flags, args: list[str]) -> None:
    min_args(args, 1)
    db = snapshots_db(node)
    with db.locked():
        doc = db.read()
        for arg in args:
            snap_id = resolve(doc["snapshots"], doc["names"], arg, "snapshot")
            record = doc["snapshots"].pop(snap_id)
            if doc["names"].get(record.get("name", "")) == snap_id:
                del doc["names"][record["name"]]
            data_dir = record.get("data_dir") or f"{node.root_dir}/snapshot/localfile/{snap_id}"
            shutil.rmtree(node.host(data_dir), ignore_errors=True)
            if node.later:
                node.host(f"{data_dir}.lease").unlink(missing_ok=True)
            print(f"removed snapshot {snap_id}")
        db.write(doc)


def version(node: Node, flags: Flags, args: list[str]) -> None:
    """Five lines (cocoon-later.md §1.7); the v0.6 build's hash and date are not known."""
    git, built = ("unknown", "unknown") if node.later else ("34c6c4a", "2026-04-27T00:00:00Z")
    print(f"Version: {node.version}\nGit hash: {git}\nBuilt: {built}\n"
          f"Golang version: go1.24.2\nOS/Arch: linux/amd64 (cocoon emulator)")  # fmt: skip


# --------------------------------------------------------------------------- images (v0.6)


def registry_manifest(ref: str) -> tuple[str, JSON]:
    """The manifest digest and manifest of ``ref`` from the OCI image layout standing for the
    registry (``COCOON_EMULATOR_REGISTRY``): by ``@digest`` (its bytes verified) or by the
    ``org.opencontainers.image.ref.name`` annotation; an index yields its linux/amd64 manifest
    (§3.1 step 2). Anything else: fetching is not emulated."""
    layout = os.environ.get("COCOON_EMULATOR_REGISTRY")
    not_emulated = f"emulator: fetching {ref} is not emulated"
    if not layout:
        fail(f"{not_emulated} (set COCOON_EMULATOR_REGISTRY to an OCI image layout holding its manifest)")
    root = Path(layout)
    _, at, digest = ref.partition("@")
    if not at:
        try:
            index = json.loads((root / "index.json").read_bytes())
        except (OSError, ValueError) as exc:
            fail(f"{not_emulated}: {root}/index.json: {exc}")
        named = [m for m in index.get("manifests") or []
                 if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref]  # fmt: skip
        if not named:
            fail(f"{not_emulated}: {root} has no manifest named {ref}")
        digest = named[0]["digest"]
    for _ in range(2):  # an index, then the platform manifest it names
        algorithm, _, hexpart = digest.partition(":")
        blob = root / "blobs" / algorithm / hexpart
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart) or not blob.is_file():
            fail(f"{not_emulated}: manifest {digest} is not in {root}")
        data = blob.read_bytes()
        if hashlib.sha256(data).hexdigest() != hexpart:
            fail(f"fetch {ref}: manifest {digest} does not match its digest")
        manifest = json.loads(data)
        if "manifests" not in manifest:
            return digest, dict(manifest)
        platform = [m for m in manifest["manifests"]
                    if (m.get("platform") or {}).get("os") == "linux"
                    and (m.get("platform") or {}).get("architecture") == "amd64"]  # fmt: skip
        if not platform:
            fail(f"fetch {ref}: no linux/amd64 manifest in the index")
        digest = platform[0]["digest"]
    fail(f"fetch {ref}: an index names another index")


def image_pull(node: Node, flags: Flags, args: list[str]) -> None:
    """``image pull`` (§3.1) of OCI references whose layers are all converted already: the
    manifest from the stand-in registry, each ``oci/blobs/<hex>.erofs`` reused, the boot
    files found under ``oci/boot/<hex>/`` (the last layer holding them wins), then the
    record committed under the reference as typed. ``--force`` changes nothing for OCI."""
    min_args(args, 1)
    db = node.db(IMAGES)
    for ref in args:
        if re.match(r"https?://", ref):
            fail(f"emulator: cloud image {ref} is not emulated")
        digest, manifest = registry_manifest(ref)
        hexes = [str(layer["digest"]).removeprefix("sha256:") for layer in manifest.get("layers") or []]
        blobs = [f"oci/blobs/{h}.erofs" for h in hexes]
        kernels = [h for h in hexes if node.rooted(f"oci/boot/{h}/vmlinuz").is_file()]
        initrds = [h for h in hexes if node.rooted(f"oci/boot/{h}/initrd.img").is_file()]
        current = images_db(node).get(ref)
        if (current and current.get("manifest_digest") == digest and kernels and initrds
                and all(node.rooted(b).is_file() for b in blobs)):  # fmt: skip
            print(f"{ref}: up to date ({digest})")
            continue
        for h, blob in zip(hexes, blobs, strict=True):
            if not node.rooted(blob).is_file():
                fail(f"emulator: layer sha256:{h} of {ref} is not in {node.root_dir}/{blob}, and fetching "
                     "and converting layers is not emulated")  # fmt: skip
        if not kernels or not initrds:
            fail(f"image {ref} missing boot files (vmlinuz/initrd.img)")
        kernel, initrd = kernels[-1], initrds[-1]
        size = sum(node.rooted(b).stat().st_size for b in blobs)
        size += node.rooted(f"oci/boot/{kernel}/vmlinuz").stat().st_size
        size += node.rooted(f"oci/boot/{initrd}/initrd.img").stat().st_size
        entry = {"ref": ref, "manifest_digest": digest, "layers": [{"digest": f"sha256:{h}"} for h in hexes],
                 "kernel_layer": f"sha256:{kernel}", "initrd_layer": f"sha256:{initrd}", "size": size,
                 "created_at": now()}  # fmt: skip
        with db.locked():
            doc = db.read()
            doc["images"][ref] = entry
            db.write(doc)
        print(f"{ref}: pulled {digest}")


Handler = Callable[[Node, Flags, list[str]], None]
COMMANDS: dict[tuple[str, ...], tuple[Mapping[str, str], Handler]] = {
    ("version",): ({}, version),
    ("vm", "run"): (CREATE_FLAGS, lambda n, f, a: vm_create(n, f, a, start=True)),
    ("vm", "create"): (CREATE_FLAGS, lambda n, f, a: vm_create(n, f, a, start=False)),
    ("vm", "clone"): (CLONE_FLAGS, vm_clone),
    ("vm", "start"): ({}, vm_start),
    ("vm", "stop"): ({"force": BOOL, "timeout": INT}, vm_stop),
    ("vm", "rm"): ({"force": BOOL}, vm_rm),
    ("vm", "list"): ({"output": STR}, vm_list),
    ("vm", "ls"): ({"output": STR}, vm_list),
    ("vm", "inspect"): ({}, vm_inspect),
    ("snapshot", "import"): ({"name": STR, "description": STR}, snapshot_import),
    ("snapshot", "list"): ({"vm": STR, "output": STR}, snapshot_list),
    ("snapshot", "ls"): ({"vm": STR, "output": STR}, snapshot_list),
    ("snapshot", "inspect"): ({}, snapshot_inspect),
    ("snapshot", "rm"): ({}, snapshot_rm),
}
"""v0.3.8's commands and their flags (§11)."""
LATER_COMMANDS = COMMANDS | {
    ("vm", "run"): (LATER_CREATE_FLAGS, COMMANDS["vm", "run"][1]),
    ("vm", "create"): (LATER_CREATE_FLAGS, COMMANDS["vm", "create"][1]),
    ("vm", "clone"): (LATER_CLONE_FLAGS, vm_clone),
    ("vm", "start"): ({"output": STR}, vm_start),
    ("vm", "stop"): ({"force": BOOL, "timeout": INT, "output": STR}, vm_stop),
    ("vm", "rm"): ({"force": BOOL, "output": STR}, vm_rm),
    ("image", "pull"): ({"force": BOOL}, image_pull),
}
"""v0.6's (cocoon-later.md §1): lifecycle verbs take ``-o json``; ``image pull`` is emulated."""
GROUPS = {"vm", "snapshot", "image", "gc", "completion", "version"}
LATER_GROUPS = GROUPS | {"meta", "daemon", "doctor"}


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--write-shim"]:
        return write_shim(argv[1:])
    try:
        later = emulated_version() != DEFAULT_VERSION
        commands, groups = (LATER_COMMANDS, LATER_GROUPS) if later else (COMMANDS, GROUPS)
        path: list[str] = []
        rest: list[str] = []
        tokens = list(argv)
        while tokens:
            tok = tokens.pop(0)
            name = tok[2:].partition("=")[0] if tok.startswith("--") else ""
            if name in GLOBAL_FLAGS and GLOBAL_FLAGS[name] != BOOL and "=" not in tok and tokens:
                rest += [tok, tokens.pop(0)]
            elif tok.startswith("-") or (path and tuple(path) in commands):
                rest.append(tok)
            elif not path and tok not in groups:
                fail(f'unknown command "{tok}" for "cocoon"')
            elif path and path[0] in ("vm", "snapshot") and (path[0], tok) not in commands:
                fail(f"emulator: `cocoon {path[0]} {tok}` is not emulated (or unknown)")
            else:
                path.append(tok)
        key = tuple(path)
        if key not in commands and key and key[0] in groups - {"vm", "snapshot", "version"}:
            fail(f"emulator: `cocoon {' '.join(path)}` is not emulated "
                 "(cocoonplan apply converts layers and records images itself)")  # fmt: skip
        if key not in commands:
            fail("emulator: give a command: version, vm run|create|clone|start|stop|rm|list|inspect, "
                 "snapshot import|list|inspect|rm" + (", image pull" if later else ""))  # fmt: skip
        spec, handler = commands[key]
        flags, args = parse_flags(rest, spec)
        if flags.get("help"):
            print(f"Usage: cocoon {' '.join(path)} [flags]\n\nFlags: " + " ".join(f"--{f}" for f in spec))
            return 0
        handler(Node(flags), flags, args)
        return 0
    except CocoonError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def install_shim(bin_dir: Path, env: Mapping[str, str] | None = None, name: str = "cocoon") -> Path:
    """Write an executable ``bin_dir/name`` that runs this emulator with ``env`` exported."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh"] + [f"export {k}={shlex.quote(v)}" for k, v in sorted((env or {}).items())]
    lines.append(f'exec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "$@"')
    shim = bin_dir / name
    shim.write_text("\n".join(lines) + "\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return shim


def shim_env(
    host_root: Path | None = None,
    *,
    cpus: int | None = None,
    version: str | None = None,
    ch: str | None = None,
    registry: Path | None = None,
    seed: str | None = None,
    api_log: Path | None = None,
) -> dict[str, str]:
    """The ``COCOON_EMULATOR_*`` settings of a shim (see the module docstring), unset ones left out."""
    values = {"HOST_ROOT": host_root, "CPUS": cpus, "VERSION": version, "CH": ch, "REGISTRY": registry,
              "SEED": seed, "API_LOG": api_log}  # fmt: skip
    return {
        f"COCOON_EMULATOR_{key}": str(Path(value).resolve()) if isinstance(value, Path) else str(value)
        for key, value in values.items()
        if value is not None
    }


def write_shim(argv: Sequence[str]) -> int:
    """``--write-shim OUT …``: an executable ``cocoon`` at OUT that runs this emulator with the
    given settings baked in (the shim a project file's ``cocoon:`` names)."""
    parser = argparse.ArgumentParser(
        prog="cocoon_emulator.py --write-shim",
        description=write_shim.__doc__ and write_shim.__doc__.split("\n")[0],
    )
    parser.add_argument("out", type=Path, help="the shim to write (its directory is created)")
    parser.add_argument("--host-root", type=Path, help="the directory standing for the node's --root-dir")
    parser.add_argument("--cpus", type=int, help="the host's (online) CPU count")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="v0.3.8 (default) or v0.6.<n>")
    parser.add_argument("--ch", choices=("upstream", "cocoonstack"), help="the Cloud Hypervisor build (v0.6)")
    parser.add_argument(
        "--registry", type=Path, help="an OCI image layout standing for registries (image pull)"
    )
    parser.add_argument("--seed", help="reproducible IDs and MACs")
    parser.add_argument("--api-log", type=Path, help="a file to log Cloud Hypervisor REST calls to")
    opts = parser.parse_args(argv)
    if opts.version != DEFAULT_VERSION and not LATER_RE.match(opts.version):
        parser.error(f"--version {opts.version}: v0.3.8 or v0.6.<n>")
    env = shim_env(opts.host_root, cpus=opts.cpus, version=opts.version, ch=opts.ch, registry=opts.registry,
                   seed=opts.seed, api_log=opts.api_log)  # fmt: skip
    out = opts.out.resolve()
    print(install_shim(out.parent, env, out.name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
