#!/usr/bin/env python3
"""A cocoon v0.3.8 emulator: the file effects of the subcommands ``cocoonplan apply`` uses.

Written from ``shared/reference/cocoon-formats.md`` (§1-§8a, §11) alone; it imports nothing of
cocoonplan, so what it writes is an independent witness of cocoon's formats. Stdlib only.

Run it as ``python tests/cocoon_emulator.py ARGS…`` or through a ``cocoon`` shim made by
:func:`install_shim`. Implemented (v0.3.8 flags, parsed strictly like cobra/pflag: an unknown
flag is ``Error: unknown flag: --x``, exit 1):

- global ``--root-dir --run-dir --log-dir --config --log-level --cni-conf-dir --cni-bin-dir --dns``;
- ``version``;
- ``vm run`` / ``vm create`` IMAGE, ``vm clone`` SNAPSHOT, ``vm start``, ``vm stop``, ``vm rm``,
  ``vm list``, ``vm inspect``;
- ``snapshot import [FILE|-]``, ``snapshot list``, ``snapshot inspect``, ``snapshot rm``;
- every other command (``image pull`` included) fails with a message saying it is not emulated.

What is NOT real: no Cloud Hypervisor runs and no CNI plugin; ``cow.raw`` and data disks are
sparse files of the right size that are **not** formatted (no ``mkfs.ext4``); ``api.sock`` is a
bound-then-closed Unix socket, ``ch.pid`` names no live process; addresses come from a fake
lease pool (``10.88.0.2``… in ``10.88.0.0/16``, gateway ``10.88.0.1``; a lease is an address
no VM record holds); log directories are recorded, never created; ``--bridge``, ``--fc`` and
cloud images are refused; ``vm clone --pull`` only warns when the image is absent (cocoon's
pull is best effort too).

Environment:
- ``COCOON_EMULATOR_HOST_ROOT=DIR``: DIR stands for ``--root-dir`` (as a ``cocoonplan --root``
  copy does): every absolute path under the root dir is read and written under DIR, while the
  records keep the node's own absolute paths (``/var/lib/cocoon/…``). Unset: paths are real.
- ``COCOON_EMULATOR_SEED``: IDs and MACs drawn from a generator seeded with this value, the
  command line and the databases' bytes (reproducible runs); unset: ``secrets``.
- ``COCOON_EMULATOR_CPUS`` (host CPU count, default ``os.cpu_count()``),
  ``COCOON_EMULATOR_HUGEPAGES=1`` (``nr_hugepages`` > 0; default off),
  ``COCOON_EMULATOR_NOW`` (a fixed timestamp for every record).
- ``COCOON_EMULATOR_FAULT``: comma-separated faults a test injects (never cocoon's behaviour):
  ``clone-drop-top-layers:N`` makes ``vm clone`` write a VM without its snapshot's top N layers
  (in its record and its ``config.json``: the layer substitution of cocoon #46);
  ``import-sleep:SECONDS`` makes ``snapshot import`` sleep after extracting its first file (the
  pending record written, the data directory half full), so a test can kill it there.
"""

from __future__ import annotations

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
import shutil
import socket
import stat
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, NoReturn

JSON = dict[str, Any]
VERSION = "v0.3.8"
MIB = 1 << 20
GIB = 1 << 30
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
DATA_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,19}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SIZE_RE = re.compile(r"^(\d+(\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$")
LEASE_NET, LEASE_GW, LEASE_PREFIX = "10.88", "10.88.0.1", 16
RUNTIME_FILES = ("api.sock", "ch.pid", "console.sock", "cmdline")


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

    def host(self, path: str) -> Path:
        if self.host_root is not None and (path == self.root_dir or path.startswith(self.root_dir + "/")):
            return self.host_root / path[len(self.root_dir) :].lstrip("/")
        return Path(path)

    def vm_dir(self, vm_id: str) -> str:
        return f"{self.run_dir}/cloudhypervisor/{vm_id}"

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


class DB:
    """One cocoon JSON database (§2): flock on the sibling ``*.lock``, whole-file atomic rewrite."""

    def __init__(self, node: Node, rel: str, lock: str, default: Callable[[], JSON]) -> None:
        self.path = node.host(f"{node.root_dir}/{rel}")
        self.lock_path = self.path.with_name(lock)
        self.default = default

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
            return self.default()
        doc = json.loads(data) if data.strip() else self.default()
        for key, value in self.default().items():
            if doc.get(key) is None:
                doc[key] = value
        return dict(doc)

    def write(self, doc: JSON) -> None:
        atomic_write(self.path, (go_json(doc) + "\n").encode(), 0o644)


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


def vms_db(node: Node) -> DB:
    return DB(node, "cloudhypervisor/db/vms.json", "vms.lock", lambda: {"vms": {}, "names": {}})


def snapshots_db(node: Node) -> DB:
    return DB(node, "snapshot/db/snapshots.json", "snapshots.lock", lambda: {"snapshots": {}, "names": {}})


def images_db(node: Node) -> JSON:
    path = node.host(f"{node.root_dir}/oci/db/images.json")
    try:
        images = json.loads(path.read_bytes()).get("images") or {}
    except FileNotFoundError:
        images = {}
    return dict(images)


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


def disk_direct(sc: Mapping[str, Any], no_direct_io: bool) -> bool:
    return bool(sc["direct_io"]) if "direct_io" in sc else not sc["ro"] and not no_direct_io


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


def ch_launch(node: Node, record: JSON) -> str:
    """The ``cmdline`` file of a cold boot (§5.7): ``cloud-hypervisor`` and its arguments."""
    cfg, vm_dir = record["config"], record["run_dir"]
    cpu, memory = cfg["cpu"], cfg["memory"]
    boot = record.get("boot_config") or {}
    cpus = f"boot={cpu},max={node.host_cpus}" + (",kvm_hyperv=on" if cfg.get("windows") else "")
    args = ["cloud-hypervisor", "--api-socket", f"{vm_dir}/api.sock", "--cpus", cpus,
            "--memory", f"size={memory}" + (",hugepages=on" if node.hugepages else "")]  # fmt: skip
    disks = []
    for sc in record["storage_configs"]:
        qcow2 = sc["path"].endswith(".qcow2")
        opts = [f"path={sc['path']}"] + (["readonly=on"] if sc["ro"] else [])
        opts += ["direct=on"] if disk_direct(sc, bool(cfg.get("no_direct_io"))) else []
        opts += [] if sc["ro"] or qcow2 else ["sparse=on"]
        opts += ["image_type=qcow2" if qcow2 else "image_type=raw"]
        opts += ["backing_files=on"] if qcow2 and not sc["ro"] else []
        opts += [f"num_queues={cpu}", f"queue_size={cfg.get('disk_queue_size') or 512}"]
        if not sc["ro"] and cpu > 1:
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
    args += ["--rng", "src=/dev/urandom", "--watchdog"]
    if memory >= 256 * MIB and not cfg.get("windows"):
        args += ["--balloon", f"size={memory // 4},deflate_on_oom=on,free_page_reporting=on"]
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


def vm_config(name: str, cpu: int, memory: int, storage: int, base: Mapping[str, Any]) -> JSON:
    """A VMConfig (§4): name first, then the ``types.Config`` fields, zero values omitted."""
    cfg: JSON = {"name": name, "cpu": cpu, "memory": memory, "storage": storage}
    for key in ("queue_size", "disk_queue_size", "image", "image_digest", "image_type", "network",
                "no_direct_io", "windows"):  # fmt: skip
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
    return record


def ordered(record: JSON) -> JSON:
    """Record keys in struct order after ``started_at``/``stopped_at`` changes."""
    order = ["id", "hypervisor", "state", "config", "pid", "socket_path", "network_configs",
             "storage_configs", "first_booted", "snapshot_ids", "created_at", "updated_at",
             "started_at", "stopped_at", "boot_config", "image_blob_ids", "run_dir", "log_dir"]  # fmt: skip
    return {k: record[k] for k in order if k in record} | {k: v for k, v in record.items() if k not in order}


def launch(node: Node, record: JSON, cmdline: str) -> None:
    """The runtime side of a start: ``cmdline``, ``ch.pid``, ``api.sock``; record ``running``."""
    vm_dir = node.host(record["run_dir"])
    vm_dir.mkdir(parents=True, exist_ok=True)
    pid = 10000 + int(hashlib.sha256(f"{record['id']}{now()}".encode()).hexdigest()[:4], 16)
    (vm_dir / "cmdline").write_bytes(cmdline.encode())
    (vm_dir / "ch.pid").write_bytes(str(pid).encode())
    sock_path = vm_dir / "api.sock"
    sock_path.unlink(missing_ok=True)
    if len(str(sock_path)) < 100:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(sock_path))
    else:
        sock_path.touch()
    stamp = now()
    record |= {"state": "running", "pid": pid, "first_booted": True, "updated_at": stamp, "started_at": stamp}
    record.pop("stopped_at", None)


def stop_runtime(node: Node, record: JSON) -> None:
    for name in RUNTIME_FILES:
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


def vm_create(node: Node, flags: Flags, args: list[str], start: bool) -> None:
    exact_args(args, 1)
    image = args[0]
    if flags.get("fc"):
        fail("emulator: --fc (Firecracker) is not emulated")
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
    images = images_db(node)
    entry = images.get(image) or next((e for e in images.values() if e.get("manifest_digest") == image), None)
    if entry is None:
        fail(f"image {image} not found: pull it first")
    base = {"queue_size": flags.get("queue-size", 0), "disk_queue_size": flags.get("disk-queue-size", 0),
            "image": image, "image_digest": entry["manifest_digest"], "image_type": "oci",
            "network": flags.get("network") or (node.default_network() if nics else ""),
            "no_direct_io": flags.get("no-direct-io", False), "windows": flags.get("windows", False)}  # fmt: skip
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
        validate_storage_configs(scs)
        nets = network_configs(doc, vm_id, nics, cpu, cfg.get("queue_size", 0), rnd)
        record = vm_record(node, vm_id, cfg, nets, scs, boot, [*layers, kernel_hex, initrd_hex], now())
        boot["cmdline"] = build_cmdline(record, node.dns)
        host_dir = node.host(vm_dir)
        host_dir.mkdir(parents=True)
        try:
            sparse_file(host_dir / "cow.raw", storage)
            for d in data_disks:
                sparse_file(host_dir / f"data-{d['name']}.raw", d["size"])
            if start:
                launch(node, record, ch_launch(node, record))
            doc["vms"][vm_id] = ordered(record)
            doc["names"][name] = vm_id
            db.write(doc)
        except BaseException:
            shutil.rmtree(host_dir, ignore_errors=True)
            raise
    print_json(record) if flags.get("output") == "json" else print(
        f"VM {name} ({vm_id}) {'running' if start else 'created'}"
    )


def vm_clone(node: Node, flags: Flags, args: list[str]) -> None:
    exact_args(args, 1)
    if flags.get("bridge"):
        fail("emulator: --bridge is not emulated")
    sdb = snapshots_db(node)
    with sdb.locked():
        sdoc = sdb.read()
    snap = sdoc["snapshots"][resolve(sdoc["snapshots"], sdoc["names"], args[0], "snapshot")]
    if snap.get("pending"):
        fail(f"snapshot {snap['id']} is still being written (pending)")
    if snap.get("hypervisor") == "firecracker":
        fail("emulator: Firecracker snapshots are not emulated")
    base = {k: snap.get(k) for k in ("image", "image_digest", "image_type", "windows", "network",
                                     "queue_size", "disk_queue_size", "no_direct_io")}  # fmt: skip
    for flag, key in (
        ("network", "network"),
        ("queue-size", "queue_size"),
        ("disk-queue-size", "disk_queue_size"),
    ):
        if flags.get(flag):
            base[key] = flags.get(flag)
    if flags.given("no-direct-io"):
        base["no_direct_io"] = flags.get("no-direct-io")
    values = {"cpu": snap.get("cpu", 0), "memory": snap.get("memory", 0), "storage": snap.get("storage", 0),
              "nics": snap.get("nics", 0)}  # fmt: skip
    for key in values:
        if flags.given(key):
            given = flags.get(key)
            given = parse_size(given) if key in ("memory", "storage") else given
            if given < values[key]:
                fail(f"--{key} {flags.get(key)} is below the snapshot's {values[key]}")
            values[key] = given
    nics = values["nics"]
    if not base.get("network") and nics:
        base["network"] = node.default_network()
    cfg = vm_config(flags.get("name", ""), values["cpu"], values["memory"], values["storage"], base)
    validate_config(cfg)
    if cfg["cpu"] > node.host_cpus:
        fail(f"cpu {cfg['cpu']} exceeds the host's {node.host_cpus} CPUs")
    if flags.get("pull"):
        images = images_db(node)
        lookup = snap.get("image_digest") or snap.get("image")
        if lookup not in images and not any(e.get("manifest_digest") == lookup for e in images.values()):
            print(f"WARN emulator: --pull cannot pull {lookup}; continuing", file=sys.stderr)
    src = node.host(snap.get("data_dir") or f"{node.root_dir}/snapshot/localfile/{snap['id']}")
    db = vms_db(node)
    with db.locked():
        doc = db.read()
        rnd = Random(f"{sys.argv[1:]}\0{go_json(doc)}")
        vm_id = rnd.new_id()
        reserve_name(doc, cfg["name"])
        vm_dir = node.vm_dir(vm_id)
        host_dir = node.host(vm_dir)
        host_dir.mkdir(parents=True)
        try:
            record = clone_files(node, src, host_dir, vm_dir, cfg, base, vm_id)
            record["network_configs"] = network_configs(
                doc, vm_id, nics, cfg["cpu"], cfg.get("queue_size", 0), rnd
            )
            record = vm_record(node, vm_id, cfg, record["network_configs"], record["storage_configs"],
                               record["boot_config"], list(snap.get("image_blob_ids") or {}), now())  # fmt: skip
            record["boot_config"]["cmdline"] = build_cmdline(record, node.dns)
            launch(node, record, f"cloud-hypervisor --api-socket {vm_dir}/api.sock")
            doc["vms"][vm_id] = ordered(record)
            doc["names"][cfg["name"]] = vm_id
            db.write(doc)
        except BaseException:
            shutil.rmtree(host_dir, ignore_errors=True)
            raise
    print_json(record) if flags.get("output") == "json" else print(f"VM {cfg['name']} ({vm_id}) cloned")


def clone_files(node: Node, src: Path, dst: Path, vm_dir: str, cfg: JSON, base: JSON, vm_id: str) -> JSON:
    """§8.3-§8.6: copy, check, rewrite disk paths, verify base files, grow, patch."""
    try:
        ch = json.loads((src / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        fail(f"snapshot config.json: {exc}")
    disks = ch.get("disks") or []
    writable = {PurePosixPath(d.get("path", "")).name for d in disks if not d.get("readonly")}
    for entry in sorted(src.iterdir()):
        if not entry.is_file() or entry.is_symlink():
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
    for sc in scs:
        if sc["role"] == "cow" and sc["path"].endswith(".raw"):
            cow = node.host(sc["path"])
            if cow.stat().st_size < cfg["storage"]:
                os.truncate(cow, cfg["storage"])
    direct_boot = bool(payload.get("kernel"))
    atomic_write(
        dst / "config.json", go_json(patch_config(ch, scs, cfg, base, vm_dir, direct_boot)).encode(), 0o600
    )
    state = json.loads((dst / "state.json").read_bytes())
    if moves:
        atomic_write(dst / "state.json", go_json(replace_paths(state, moves)).encode(), 0o600)
    return {"id": vm_id, "storage_configs": scs, "boot_config": boot}


def patch_config(
    ch: JSON, scs: Sequence[JSON], cfg: JSON, base: JSON, vm_dir: str, direct_boot: bool
) -> JSON:
    """``patchCHConfig`` (§8.6, §6.4): only the listed fields; top level and decoded maps sorted."""
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
                        "direct": disk_direct(sc, no_direct),
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


def vm_each(node: Node, args: list[str], action: Callable[[JSON, JSON], None]) -> None:
    min_args(args, 1)
    db = vms_db(node)
    with db.locked():
        doc = db.read()
        for arg in args:
            action(doc, doc["vms"][resolve(doc["vms"], doc["names"], arg, "VM")])
        db.write(doc)


def vm_start(node: Node, flags: Flags, args: list[str]) -> None:
    def start(doc: JSON, record: JSON) -> None:
        if record["state"] == "running":
            return
        boot = record.get("boot_config") or {}
        verify_base_files(node, record["storage_configs"], boot)
        launch(node, record, ch_launch(node, record))
        doc["vms"][record["id"]] = ordered(record)
        print(f"started {record['config']['name']} ({record['id']})")

    vm_each(node, args, start)


def vm_stop(node: Node, flags: Flags, args: list[str]) -> None:
    def stop(doc: JSON, record: JSON) -> None:
        stop_runtime(node, record)
        if record["state"] != "stopped":
            stamp = now()
            record |= {"state": "stopped", "pid": 0, "updated_at": stamp, "stopped_at": stamp}
        doc["vms"][record["id"]] = ordered(record)
        print(f"stopped {record['config']['name']} ({record['id']})")

    vm_each(node, args, stop)


def vm_rm(node: Node, flags: Flags, args: list[str]) -> None:
    def remove(doc: JSON, record: JSON) -> None:
        if record["state"] == "running" and not flags.get("force"):
            fail(f"VM {record['config']['name']} ({record['id']}) is running: stop it first or use --force")
        stop_runtime(node, record)
        shutil.rmtree(node.host(record["run_dir"]), ignore_errors=True)
        del doc["vms"][record["id"]]
        if doc["names"].get(record["config"]["name"]) == record["id"]:
            del doc["names"][record["config"]["name"]]
        print(f"removed {record['config']['name']} ({record['id']})")

    vm_each(node, args, remove)


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
        if not isinstance(envelope, dict) or envelope.get("version") != 1:
            version = envelope.get("version") if isinstance(envelope, dict) else None
            fail(f"import: unsupported snapshot.json version {version!r} (want 1)")
        config = envelope.get("config")
        if not isinstance(config, dict):
            fail("import: snapshot.json has no config")
        name = flags.get("name") or config.get("name") or ""
        db = snapshots_db(node)
        with db.locked():
            doc = db.read()
            if name and name in doc["names"]:
                fail(f"snapshot name {name!r} already exists ({doc['names'][name]})")
            snap_id = Random(f"{sys.argv[1:]}\0{go_json(doc)}").new_id()
            data_dir = f"{node.root_dir}/snapshot/localfile/{snap_id}"
            record = snapshot_record(config, snap_id, name, flags.get("description") or config.get("description"),
                                     data_dir)  # fmt: skip
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
    print(snap_id)


def snapshot_record(config: JSON, snap_id: str, name: str, description: str | None, data_dir: str) -> JSON:
    """A snapshots.json record (§6.6), struct key order, ``omitempty`` except name and created_at."""
    record: JSON = {}
    for key in ("cpu", "memory", "storage", "queue_size", "disk_queue_size", "image", "image_digest",
                "image_type", "network", "no_direct_io", "windows"):  # fmt: skip
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
    return record | {"created_at": now(), "data_dir": data_dir}


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
            shutil.rmtree(node.host(record.get("data_dir") or f"{node.root_dir}/snapshot/localfile/{snap_id}"),
                          ignore_errors=True)  # fmt: skip
            print(f"removed snapshot {snap_id}")
        db.write(doc)


def version(node: Node, flags: Flags, args: list[str]) -> None:
    print(f"Version: {VERSION}\nGit hash: 34c6c4a\nBuilt: 2026-04-27T00:00:00Z\n"
          f"Golang version: go1.24.2\nOS/Arch: linux/amd64 (cocoon emulator)")  # fmt: skip


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
GROUPS = {"vm", "snapshot", "image", "gc", "completion", "version"}


def main(argv: Sequence[str]) -> int:
    try:
        path: list[str] = []
        rest: list[str] = []
        tokens = list(argv)
        while tokens:
            tok = tokens.pop(0)
            name = tok[2:].partition("=")[0] if tok.startswith("--") else ""
            if name in GLOBAL_FLAGS and GLOBAL_FLAGS[name] != BOOL and "=" not in tok and tokens:
                rest += [tok, tokens.pop(0)]
            elif tok.startswith("-") or (path and tuple(path) in COMMANDS):
                rest.append(tok)
            elif not path and tok not in GROUPS:
                fail(f'unknown command "{tok}" for "cocoon"')
            elif path and path[0] in ("vm", "snapshot") and (path[0], tok) not in COMMANDS:
                fail(f"emulator: `cocoon {path[0]} {tok}` is not emulated (or unknown)")
            else:
                path.append(tok)
        key = tuple(path)
        if key and key[0] in ("image", "gc", "completion"):
            fail(f"emulator: `cocoon {' '.join(path)}` is not emulated "
                 "(cocoonplan apply converts layers and records images itself)")  # fmt: skip
        if key not in COMMANDS:
            fail("emulator: give a command: version, vm run|create|clone|start|stop|rm|list|inspect, "
                 "snapshot import|list|inspect|rm")  # fmt: skip
        spec, handler = COMMANDS[key]
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
    import shlex

    bin_dir.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh"] + [f"export {k}={shlex.quote(v)}" for k, v in sorted((env or {}).items())]
    lines.append(f'exec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "$@"')
    shim = bin_dir / name
    shim.write_text("\n".join(lines) + "\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return shim


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
