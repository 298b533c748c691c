"""Build real, deterministic cocoon test content: OCI image layers, image and snapshot
artifacts, OCI image layouts, EROFS blobs and whole cocoon node roots.

Everything here produces the same bytes on every run: tar entries are sorted with mtime 0
and uid/gid 0, gzip carries mtime 0, timestamps are fixed strings and IDs come from hashes.
The formats follow ``shared/reference/cocoon-formats.md`` (cocoon v0.3.8, epoch v1 push,
Cloud Hypervisor v51). Nothing here imports cocoonplan: the fixtures are an independent
witness of what cocoon and the registry hold.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import posixpath
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

JSON = dict[str, Any]

GIB = 1 << 30
MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
SNAPSHOT_ARTIFACT = "application/vnd.cocoonstack.snapshot.v1+json"
SNAPSHOT_CONFIG = "application/vnd.cocoonstack.snapshot.config.v1+json"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
REF_NAME = "org.opencontainers.image.ref.name"
BASE_IMAGE = "cocoonstack.snapshot.baseimage"
DEFAULT_DNS = ("8.8.8.8", "1.1.1.1")
_FILE_MEDIA_TYPES = {
    "config.json": "application/vnd.cocoonstack.vm.config+json",
    "state.json": "application/vnd.cocoonstack.vm.state+json",
    "memory-ranges": "application/vnd.cocoonstack.vm.memory",
}


class _Default(Enum):
    BASE_REF = "base_ref"  # snapshot(): annotate the manifest with base_ref
    AS_WRITTEN = "as_written"  # OwnerRecord: the value node_root wrote for that VM


AS_WRITTEN = _Default.AS_WRITTEN


# --------------------------------------------------------------------------- encoding


def go_json(value: Any, *, indent: bool = False) -> bytes:
    """Encode like Go ``json.Marshal`` (or ``MarshalIndent(v, "", "  ")``): dict order kept,
    no trailing newline, ``<``, ``>`` and ``&`` escaped. Sort Go maps before calling."""
    text = json.dumps(
        value,
        ensure_ascii=False,
        indent=2 if indent else None,
        separators=(",", ": ") if indent else (",", ":"),
    )
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def derive_id(*parts: str) -> str:
    """A cocoon-style 26-character ID (base32 ``A-Z2-7``) derived from a hash of ``parts``."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return base64.b32encode(digest).decode()[:26]


def derive_mac(*parts: str) -> str:
    """A locally administered unicast MAC derived from a hash of ``parts``."""
    raw = bytearray(hashlib.sha256("\0".join(("mac", *parts)).encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _hex(digest_or_hex: str) -> str:
    return digest_or_hex.removeprefix("sha256:")


def _filler(seed: str, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:size])


# --------------------------------------------------------------------------- blobs and layers


@dataclass(frozen=True)
class Blob:
    """One content-addressed blob with the media type and annotations of its descriptor."""

    media_type: str
    data: bytes
    annotations: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def hex(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hex

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> JSON:
        """The OCI descriptor, keys in Go struct order, annotations sorted (omitted if empty)."""
        desc: JSON = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            desc["annotations"] = dict(sorted(self.annotations.items()))
        return desc


def layer(files: Mapping[str, bytes], modes: Mapping[str, int] | None = None) -> Blob:
    """A deterministic gzip tar layer of regular files (0644, or their ``modes``) plus their
    parent dirs (0755)."""
    entries: dict[str, bytes | None] = {}
    for name, data in files.items():
        clean = posixpath.normpath(name)
        if clean.startswith(("/", "..")) or clean != name.rstrip("/"):
            raise ValueError(f"layer file names must be clean relative paths: {name!r}")
        entries[clean] = data
        parent = posixpath.dirname(clean)
        while parent:
            entries.setdefault(parent, None)
            parent = posixpath.dirname(parent)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = (modes or {}).get(name, 0o644), len(content)
                tar.addfile(info, io.BytesIO(content))
    return Blob(OCI_LAYER_GZIP, gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))


@dataclass(frozen=True)
class Entry:
    """One tar entry of a hand-built layer (:func:`layer_of`)."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    linkname: str = ""


def regular(name: str, data: bytes, mode: int = 0o644) -> Entry:
    """A regular file."""
    return Entry(name, tarfile.REGTYPE, data, mode)


def directory(name: str, mode: int = 0o755) -> Entry:
    """A directory."""
    return Entry(name, tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Entry:
    """A symbolic link to ``target`` as written."""
    return Entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hardlink(name: str, target: str) -> Entry:
    """A hard link to the earlier entry ``target`` of the same layer."""
    return Entry(name, tarfile.LNKTYPE, linkname=target)


def whiteout(path: str) -> Entry:
    """The OCI whiteout deleting ``path`` of the layers below (``DIR/.wh.NAME``)."""
    parent, name = posixpath.split(path)
    return Entry(posixpath.join(parent, f".wh.{name}"), tarfile.REGTYPE, mode=0o600)


def opaque(path: str) -> Entry:
    """The OCI marker making directory ``path`` opaque (``DIR/.wh..wh..opq``)."""
    return Entry(posixpath.join(path, ".wh..wh..opq"), tarfile.REGTYPE, mode=0o600)


def layer_of(entries: Iterable[Entry], *, compresslevel: int = 9) -> Blob:
    """A deterministic gzip tar layer of exactly ``entries``, in the order given (no parents
    added, nothing sorted: as a build tool that diffs a tree writes them). The tar is
    compressed as it is written, so a layer of many files is never whole in memory."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=compresslevel, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.mode, info.linkname = entry.type, entry.mode, entry.linkname
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.size = len(entry.data) if entry.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(entry.data) if info.size else None)
    return Blob(OCI_LAYER_GZIP, buf.getvalue())


def layer_tar(blob: Blob) -> bytes:
    """The uncompressed tar of a layer blob (its sha256 is the diff_id)."""
    return gzip.decompress(blob.data) if blob.media_type.endswith("+gzip") else blob.data


def files_of(blob: Blob) -> dict[str, bytes]:
    """The regular files of a layer, by entry name, in tar order."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(layer_tar(blob))) as tar:
        for member in tar:
            extracted = tar.extractfile(member) if member.isreg() else None
            if extracted is not None:
                out[member.name] = extracted.read()
    return out


def boot_files(blob: Blob) -> tuple[bytes | None, bytes | None]:
    """(kernel, initrd) found by cocoon's boot scan (§3.4); the last match in tar order wins."""
    kernel: bytes | None = None
    initrd: bytes | None = None
    for name, data in files_of(blob).items():
        clean = posixpath.normpath(name)
        base = posixpath.basename(clean)
        if posixpath.dirname(clean) not in ("boot", "", ".") or base.endswith(".old"):
            continue
        if base.startswith("vmlinuz"):
            kernel = data
        elif base.startswith("initrd.img"):
            initrd = data
    return kernel, initrd


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Nic:
    """A NIC with a static IP (``ip=None`` = DHCP); empty tap/mac are derived from the VM ID."""

    ip: str | None = None
    prefix: int = 16
    gateway: str = ""
    tap: str = ""
    mac: str = ""


@dataclass(frozen=True)
class DataDisk:
    """A ``--data-disk``: size in bytes; ``mount=None`` means cocoon's default ``/mnt/<name>``."""

    name: str
    size: int
    fstype: str = "ext4"
    mount: str | None = None

    @property
    def mount_point(self) -> str:
        if self.mount is not None:
            return self.mount
        return "" if self.fstype == "none" else f"/mnt/{self.name}"


@dataclass(frozen=True)
class SourceVM:
    """The VM a hot snapshot was taken from (memory and storage in bytes)."""

    id: str
    name: str
    cpu: int = 2
    memory: int = GIB
    storage: int = 10 * GIB
    nics: Sequence[Nic] = ()
    data_disks: Sequence[DataDisk] = ()
    host_cpus: int = 16
    vsock: bool = False
    """Launched with ``--vsock`` (cocoon v0.6): the snapshot's config.json then has a vsock device."""
    ch_extra: tuple[tuple[str, Any], ...] = ()
    """Top-level keys a Cloud Hypervisor build adds to config.json beyond v51's VmConfig."""


@dataclass(frozen=True)
class SnapshotSpec:
    """What a snapshot artifact was rendered from, so a node can re-render it on other layers."""

    vm: SourceVM
    layers: tuple[str, ...]
    kernel_hex: str
    initrd_hex: str
    root_dir: str
    run_dir: str


@dataclass(frozen=True)
class Artifact:
    """An OCI manifest (exact bytes) with its config and layer blobs."""

    manifest: bytes
    config: Blob
    layers: tuple[Blob, ...]
    snapshot: SnapshotSpec | None = None

    @cached_property
    def hex(self) -> str:
        return hashlib.sha256(self.manifest).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hex

    @property
    def media_type(self) -> str:
        return str(json.loads(self.manifest)["mediaType"])

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> JSON:
        desc: JSON = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest)}
        if annotations:
            desc["annotations"] = dict(sorted(annotations.items()))
        return desc

    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    def file(self, title: str) -> bytes:
        """The payload of the layer titled ``title`` (a snapshot file such as ``cocoon.json``)."""
        for blob in self.layers:
            if blob.annotations.get(TITLE) == title:
                return blob.data
        raise KeyError(title)

    def boot_layers(self) -> tuple[Blob, Blob]:
        """(kernel layer, initrd layer): the last layer holding each boot file (§3.4)."""
        kernel = initrd = None
        for blob in self.layers:
            has_kernel, has_initrd = boot_files(blob)
            kernel = blob if has_kernel is not None else kernel
            initrd = blob if has_initrd is not None else initrd
        if kernel is None or initrd is None:
            raise ValueError("image missing boot files (vmlinuz/initrd.img)")
        return kernel, initrd


def image(layers: Sequence[Blob], *, created: str = "2026-05-13T08:00:00Z") -> Artifact:
    """An OCI image manifest with a real image config (amd64/linux, diff_ids of the tars)."""
    diff_ids = ["sha256:" + hashlib.sha256(layer_tar(b)).hexdigest() for b in layers]
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": f"ocifixture layer {i}"} for i in range(len(layers))],
    }
    config_blob = Blob(OCI_CONFIG, go_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layers],
        "annotations": {CREATED: created},
    }
    return Artifact(go_json(manifest, indent=True), config_blob, tuple(layers))


# --------------------------------------------------------------------------- cocoon rules


def build_cmdline(n_layers: int, name: str, nics: Sequence[Nic], dns: Sequence[str] = DEFAULT_DNS) -> str:
    """The guest kernel command line cocoon builds (§5.5)."""
    layers = ",".join(f"cocoon-layer{j}" for j in reversed(range(n_layers)))
    parts = [
        "console=hvc0 loglevel=3 boot=cocoon-overlay",
        f"cocoon.layers={layers}",
        "cocoon.cow=cocoon-cow",
        "clocksource=kvm-clock rw",
    ]
    if nics:
        parts.append(f"net.ifnames=0 cocoon.hostname={name}")
    for i, nic in enumerate(nics):
        if nic.ip is None:
            continue
        mask = (0xFFFFFFFF << (32 - nic.prefix)) & 0xFFFFFFFF
        netmask = ".".join(str((mask >> s) & 0xFF) for s in (24, 16, 8, 0))
        parts.append(":".join([f"ip={nic.ip}", "", nic.gateway, netmask, name, f"eth{i}", "off", *dns[:2]]))
    return " ".join(parts)


def storage_configs(
    layers: Sequence[str], vm_dir: str, data_disks: Sequence[DataDisk], root_dir: str
) -> list[JSON]:
    """A VM's StorageConfig list in disk order (§5.4): layers, cow, data disks."""
    out: list[JSON] = [
        {
            "path": f"{root_dir}/oci/blobs/{_hex(h)}.erofs",
            "ro": True,
            "serial": f"cocoon-layer{j}",
            "role": "layer",
        }
        for j, h in enumerate(layers)
    ]
    out.append({"path": f"{vm_dir}/cow.raw", "ro": False, "serial": "cocoon-cow", "role": "cow"})
    for d in data_disks:
        sc: JSON = {"path": f"{vm_dir}/data-{d.name}.raw", "ro": False, "serial": d.name, "role": "data"}
        if d.mount_point:
            sc["mount_point"] = d.mount_point
        sc["fstype"] = d.fstype
        out.append(sc)
    return out


def _disk_direct(sc: Mapping[str, Any], no_direct_io: bool = False) -> bool:
    return bool(sc["direct_io"]) if "direct_io" in sc else not sc["ro"] and not no_direct_io


def _tap_mac(vm_id: str, i: int, nic: Nic) -> tuple[str, str]:
    return nic.tap or f"tap{vm_id[:8]}-{i}", nic.mac or derive_mac(vm_id, str(i))


def _vsock(scs: Sequence[JSON]) -> JSON:
    run_dir = next(sc["path"] for sc in scs if sc["role"] == "cow").rsplit("/", 1)[0]
    return {"cid": 3, "socket": f"{run_dir}/vsock.uds", "iommu": False, "id": "_vsock0", "pci_segment": 0}


# fmt: off
def _ch_config(vm: SourceVM, scs: Sequence[JSON], kernel: str, initrd: str, cmdline: str) -> JSON:
    """The source VM's CH v51 VmConfig as CH writes it at ``vm.snapshot`` (Example C's key order)."""
    affinity = [{"queue_index": i, "host_cpus": [i]} for i in range(vm.cpu)] if vm.cpu > 1 else None
    disks = [
        {"backing_files": False, "direct": _disk_direct(sc), "disable_aio": False, "disable_io_uring": False,
         "id": f"_disk{i}", "image_type": "Raw", "iommu": False, "num_queues": vm.cpu, "path": sc["path"],
         "pci_segment": 0, "queue_affinity": None if sc["ro"] else affinity, "queue_size": 512,
         "rate_limit_group": None, "rate_limiter_config": None, "readonly": sc["ro"], "serial": sc["serial"],
         "sparse": True, "vhost_socket": None, "vhost_user": False}
        for i, sc in enumerate(scs)
    ]
    nets = []
    for i, nic in enumerate(vm.nics):
        tap, mac = _tap_mac(vm.id, i, nic)
        nets.append({"tap": tap, "ip": None, "mask": None, "mac": mac, "host_mac": None, "mtu": None,
                     "iommu": False, "num_queues": max(2, 2 * vm.cpu), "queue_size": 512, "vhost_user": False,
                     "vhost_socket": None, "vhost_mode": "Client", "id": f"_net{len(disks) + i}", "fds": None,
                     "rate_limiter_config": None, "pci_segment": 0, "offload_tso": True, "offload_ufo": True,
                     "offload_csum": True})
    balloon = {"size": vm.memory // 4, "deflate_on_oom": True, "free_page_reporting": True}
    return {
        "balloon": balloon if vm.memory >= 256 * MIB else None,
        "console": {"file": None, "socket": None, "mode": "Pty", "iommu": False},
        "cpus": {"affinity": None, "boot_vcpus": vm.cpu, "features": {"amx": False}, "kvm_hyperv": False,
                 "max_phys_bits": 46, "max_vcpus": vm.host_cpus, "nested": True, "topology": None},
        "debug_console": {"file": None, "mode": "Off", "iobase": 233},
        "devices": None,
        "disks": disks,
        "fs": None,
        "iommu": False,
        "landlock_enable": False,
        "landlock_rules": None,
        "memory": {"hotplug_method": "Acpi", "hotplug_size": None, "hotplugged_size": None, "hugepage_size": None,
                   "hugepages": False, "mergeable": False, "prefault": False, "shared": False, "size": vm.memory,
                   "thp": True, "zones": None},
        "net": nets or None,
        "numa": None,
        "payload": {"firmware": None, "kernel": kernel, "cmdline": cmdline, "initramfs": initrd},
        "pci_segments": None,
        "platform": None,
        "pmem": None,
        "pvpanic": False,
        "rate_limit_groups": None,
        "rng": {"src": "/dev/urandom", "iommu": False},
        "serial": {"file": None, "socket": None, "mode": "Off", "iommu": False},
        "tpm": None,
        "user_devices": None,
        "vdpa": None,
        "vsock": _vsock(scs) if vm.vsock else None,
        "watchdog": True,
    } | dict(vm.ch_extra)


# fmt: on


def _segments(size: int, seed: str, count: int) -> list[tuple[int, bytes]]:
    """Tiny 4 KiB data segments spread over a sparse file of ``size`` bytes."""
    offsets = sorted({min(size - 4096, k * (size // count)) // 4096 * 4096 for k in range(count)})
    return [(off, _filler(f"{seed}@{off}", 4096)) for off in offsets]


def _snapshot_files(spec: SnapshotSpec, layers: Sequence[str]) -> dict[str, bytes]:
    """cocoon.json, config.json and state.json of a snapshot whose disks name ``layers``."""
    vm = spec.vm
    vm_dir = f"{spec.run_dir}/cloudhypervisor/{vm.id}"
    scs = storage_configs(layers, vm_dir, vm.data_disks, spec.root_dir)
    kernel = f"{spec.root_dir}/oci/boot/{spec.kernel_hex}/vmlinuz"
    initrd = f"{spec.root_dir}/oci/boot/{spec.initrd_hex}/initrd.img"
    cmdline = build_cmdline(len(layers), vm.name, vm.nics)
    boot = {"kernel_path": kernel, "initrd_path": initrd, "cmdline": cmdline}
    ch = _ch_config(vm, scs, kernel, initrd, cmdline)
    devices: list[JSON] = [
        {"id": d["id"], "disk_path": d["path"], "readonly": d["readonly"]} for d in ch["disks"]
    ]
    devices += [{"id": n["id"], "tap": n["tap"], "mac": n["mac"]} for n in ch["net"] or ()]
    state = {"version": "v51.0", "vm": {"vcpus": vm.cpu, "memory_size": vm.memory}, "devices": devices}
    return {
        "cocoon.json": go_json({"storage_configs": scs, "boot_config": boot}),
        "config.json": go_json(ch),
        "state.json": go_json(state),
    }


def snapshot(
    base: Artifact,
    *,
    base_ref: str,
    vm: SourceVM,
    root_dir: str = "/var/lib/cocoon",
    run_dir: str | None = None,
    layers_override: Sequence[str] | None = None,
    image_blob_ids_override: Iterable[str] | None = None,
    blob_ids_as_array: bool = False,
    image_digest_override: str | None = None,
    base_image_annotation: str | _Default | None = _Default.BASE_REF,
    snapshot_id: str | None = None,
    created: str = "2026-05-14T09:12:33.481207394Z",
    kernel_override: str | None = None,
    config_override: Mapping[str, Any] | None = None,
) -> Artifact:
    """A cocoon hot-snapshot artifact exactly as epoch v1 pushes it (§7).

    ``layers_override`` (digests or hexes) makes cocoon.json/config.json name another layer list
    than ``base`` while the config blob keeps ``base``'s image, digest and blob set. The kernel
    and initrd are those of ``base``, unless ``kernel_override`` names the layer (digest or hex)
    whose boot directory the snapshot's kernel path points into. ``config_override`` replaces
    fields of the config blob (a registry's hostile or broken values)."""
    kernel_layer, initrd_layer = base.boot_layers()
    spec = SnapshotSpec(
        vm=vm,
        layers=tuple(_hex(h) for h in (layers_override or [b.hex for b in base.layers])),
        kernel_hex=_hex(kernel_override) if kernel_override else kernel_layer.hex,
        initrd_hex=initrd_layer.hex,
        root_dir=root_dir,
        run_dir=run_dir or f"{root_dir}/run",
    )
    files = _snapshot_files(spec, spec.layers)
    payloads: list[tuple[str, bytes, int, list[tuple[int, bytes]] | None]] = [
        ("cocoon.json", files["cocoon.json"], 384, None),
        ("config.json", files["config.json"], 420, None),
        ("cow.raw", b"", 420, _segments(vm.storage, f"{vm.id}/cow.raw", 3)),
    ]
    payloads += [
        (f"data-{d.name}.raw", b"", 420, _segments(d.size, f"{vm.id}/{d.name}", 1)) for d in vm.data_disks
    ]
    payloads.append(("memory-ranges", b"", 420, _segments(vm.memory, f"{vm.id}/memory", 2)))
    payloads.append(("state.json", files["state.json"], 420, None))
    sizes = {"cow.raw": vm.storage, "memory-ranges": vm.memory} | {
        f"data-{d.name}.raw": d.size for d in vm.data_disks
    }

    layers: list[Blob] = []
    file_meta: dict[str, JSON] = {}
    for name, data, mode, segments in payloads:
        meta: JSON = {"mode": mode}
        if segments is not None:
            data = b"".join(seg for _, seg in segments)
            meta["sparseMap"] = go_json([{"o": off, "l": len(seg)} for off, seg in segments]).decode()
            meta["sparseSize"] = sizes[name]
        media_type = _FILE_MEDIA_TYPES.get(
            name,
            "application/vnd.cocoonstack.disk.raw" if name.endswith(".raw") else "application/octet-stream",
        )
        layers.append(Blob(media_type, data, {TITLE: name}))
        file_meta[name] = meta

    blob_ids = sorted(
        {_hex(h) for h in image_blob_ids_override}
        if image_blob_ids_override is not None
        else {b.hex for b in base.layers} | {kernel_layer.hex, initrd_layer.hex}
    )
    config = {
        "schemaVersion": "v1",
        "snapshotId": snapshot_id or derive_id("snapshot", vm.id, base.digest, created),
        "image": base_ref,
        "imageDigest": image_digest_override or base.digest,
        "imageType": "oci",
        "imageBlobIds": blob_ids if blob_ids_as_array else {h: {} for h in blob_ids},
        "hypervisor": "cloud-hypervisor",
        "cpu": vm.cpu,
        "memory": vm.memory,
        "storage": vm.storage,
        "nics": len(vm.nics),
        "files": dict(sorted(file_meta.items())),
        "createdAt": created,
    } | dict(config_override or {})
    config_blob = Blob(SNAPSHOT_CONFIG, go_json(config))
    annotations = {CREATED: created[:19] + "Z"}
    baseimage = base_ref if base_image_annotation is _Default.BASE_REF else base_image_annotation
    if baseimage is not None:
        annotations[BASE_IMAGE] = baseimage
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SNAPSHOT_ARTIFACT,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layers],
        "annotations": dict(sorted(annotations.items())),
    }
    return Artifact(go_json(manifest, indent=True), config_blob, tuple(layers), spec)


# --------------------------------------------------------------------------- layouts and registries


def write_layout(path: Path, artifacts: Mapping[str, Artifact]) -> None:
    """Write an OCI image layout; each manifest is tagged ``ref.name`` = its key (sorted)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_bytes(go_json({"imageLayoutVersion": "1.0.0"}))
    manifests = []
    for ref, art in sorted(artifacts.items()):
        manifests.append(art.descriptor({REF_NAME: ref}))
        (blobs / art.hex).write_bytes(art.manifest)
        for blob in art.blobs():
            (blobs / blob.hex).write_bytes(blob.data)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    (path / "index.json").write_bytes(go_json(index, indent=True) + b"\n")


def push_with_oras(host: str, reference: str, artifact: Artifact) -> str:
    """Push ``artifact`` to ``host/reference`` (``repo:tag``) with oras-py over plain http.

    Blobs go through oras' upload; the manifest bytes are PUT verbatim so the digest is kept.
    Returns the digest the registry reports (checked against ``artifact.digest``)."""
    import oras.client  # type: ignore[import-untyped,unused-ignore]
    import oras.provider  # type: ignore[import-untyped,unused-ignore]

    wrapped = getattr(oras.provider.Registry.do_request, "__wrapped__", None)
    if wrapped is not None:  # drop oras' 131 s retry loop, once
        oras.provider.Registry.do_request = wrapped
    client = oras.client.OrasClient(hostname=host, insecure=True)
    container = client.get_container(f"{host}/{reference}")
    with tempfile.TemporaryDirectory() as tmp:
        for blob in artifact.blobs():
            blob_path = Path(tmp) / blob.hex
            blob_path.write_bytes(blob.data)
            layer_desc = {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}
            response = client.upload_blob(str(blob_path), container, layer_desc)
            if response.status_code not in (200, 201, 202):
                raise RuntimeError(f"blob upload {blob.digest}: HTTP {response.status_code} {response.text}")
    response = client.do_request(
        f"{client.prefix}://{container.manifest_url()}",
        "PUT",
        data=artifact.manifest,
        headers={"Content-Type": artifact.media_type},
    )
    if response.status_code != 201:
        raise RuntimeError(f"manifest PUT: HTTP {response.status_code} {response.text}")
    digest = str(response.headers.get("Docker-Content-Digest", ""))
    if digest != artifact.digest:
        raise RuntimeError(f"registry stored {digest}, expected {artifact.digest}")
    return digest


def push_with_skopeo(layout_dir: Path, ref_name: str, dest: str) -> str:
    """Copy ``oci:layout_dir:ref_name`` to ``docker://dest`` with skopeo (plain http, digests
    preserved) and return the manifest digest the registry serves."""
    flags = ["--quiet", "--preserve-digests", "--dest-tls-verify=false"]
    source, target = f"oci:{layout_dir}:{ref_name}", f"docker://{dest}"
    subprocess.run(["skopeo", "copy", *flags, source, target], check=True, capture_output=True)
    inspect = ["skopeo", "inspect", "--raw", "--tls-verify=false", target]
    raw = subprocess.run(inspect, check=True, capture_output=True).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------- EROFS


def erofs_from_layer(blob: Blob, out: Path) -> Path:
    """Convert a layer to EROFS the way cocoon does (§3.3), via a temp dir (erofs-utils 1.5
    has no ``--tar``): ``-zlz4hc -C4096 -T0 --all-root -U uuid5(URL, layer hex)``."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(layer_tar(blob))) as tar:
        root = Path(tmp) / "root"
        root.mkdir()
        for member in tar:
            target = root / posixpath.normpath(member.name)
            if root not in target.parents:
                raise ValueError(f"layer entry escapes the root: {member.name!r}")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(member.mode)
            elif member.isreg():
                target.parent.mkdir(parents=True, exist_ok=True)
                extracted = tar.extractfile(member)
                target.write_bytes(extracted.read() if extracted else b"")
                target.chmod(member.mode)
            else:
                raise ValueError(f"unsupported layer entry type for {member.name!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
        fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, blob.hex))
        flags = ["--quiet", "-zlz4hc", "-C4096", "-T0", "--all-root", "-U", fs_uuid]
        subprocess.run(["mkfs.erofs", *flags, str(out), str(root)], check=True, capture_output=True)
    return out


# --------------------------------------------------------------------------- node roots


@dataclass(frozen=True)
class Run:
    """A VM created by ``cocoon vm run <image>``; ``image`` is a key of node_root's ``images``."""

    image: str


@dataclass(frozen=True)
class Clone:
    """A VM created by ``cocoon vm clone`` from a snapshot artifact built by :func:`snapshot`."""

    snapshot: Artifact


@dataclass(frozen=True)
class NodeVM:
    """A VM on a node. ``layers`` (digests or hexes) substitutes the layer set the VM runs on;
    ``None`` takes the image's layers (run) or the snapshot's cocoon.json layers (clone).
    ``data_disks`` apply to runs only: a clone's disks come from its snapshot.

    ``state`` is the record's; a VM that is not running has no ``cmdline`` file (cocoon's stop
    deletes it). ``started_by`` says how the running VMM was launched: ``create`` (``vm run``'s
    arguments, or a clone's API socket alone), ``start`` (a cold boot from the record, after
    ``vm stop``/``vm start``) or ``restore`` (``vm restore`` of a snapshot of the VM itself,
    which leaves that snapshot's files in its run dir; a clone's still boots its source's
    payload). ``network`` is the recorded network."""

    id: str
    name: str
    source: Run | Clone
    layers: Sequence[str] | None = None
    state: str = "running"
    cpu: int = 2
    memory: int = GIB
    storage: int = 10 * GIB
    nics: Sequence[Nic] = ()
    data_disks: Sequence[DataDisk] = ()
    host_cpus: int = 16
    started_by: str = "create"
    network: str = ""
    snapshot_id: str = "SNAPOFITSELFAAAAAAAAAAAAAA"
    """The snapshot a ``restore`` restored (recorded in ``snapshot_ids``)."""


def ch_cli_args(vm: NodeVM, vm_dir: str, scs: Sequence[JSON], boot: Mapping[str, str]) -> list[str]:
    """``cloud-hypervisor`` followed by the arguments cocoon launches a fresh VM with (§5.7)."""
    cpus, memory = f"boot={vm.cpu},max={vm.host_cpus}", f"size={vm.memory}"
    args = [
        "cloud-hypervisor",
        "--api-socket",
        f"{vm_dir}/api.sock",
        "--cpus",
        cpus,
        "--memory",
        memory,
        "--disk",
    ]
    for sc in scs:
        opts = [f"path={sc['path']}"] + (["readonly=on"] if sc["ro"] else [])
        opts += (["direct=on"] if _disk_direct(sc) else []) + ([] if sc["ro"] else ["sparse=on"])
        opts += ["image_type=raw", f"num_queues={vm.cpu}", "queue_size=512"]
        if not sc["ro"] and vm.cpu > 1:
            opts.append("queue_affinity=[" + ",".join(f"{i}@[{i}]" for i in range(vm.cpu)) + "]")
        args.append(",".join([*opts, f"serial={sc['serial']}"]))
    args += [
        "--kernel",
        boot["kernel_path"],
        "--initramfs",
        boot["initrd_path"],
        "--cmdline",
        boot["cmdline"],
    ]
    if vm.nics:
        args.append("--net")
        for i, nic in enumerate(vm.nics):
            tap, mac = _tap_mac(vm.id, i, nic)
            queues = f"num_queues={max(2, 2 * vm.cpu)},queue_size=512"
            args.append(f"tap={tap},mac={mac},{queues},offload_tso=on,offload_ufo=on,offload_csum=on")
    args += ["--rng", "src=/dev/urandom", "--watchdog"]
    if vm.memory >= 256 * MIB:
        args += ["--balloon", f"size={vm.memory // 4},deflate_on_oom=on,free_page_reporting=on"]
    return [*args, "--serial", "off", "--console", "pty"]


def patch_ch_config(config: bytes, scs: Sequence[JSON], cpu: int, memory: int) -> bytes:
    """Cocoon's in-place clone patch of a snapshot's config.json (§8.6, direct boot)."""
    cfg: JSON = json.loads(config)
    if len(cfg["disks"]) != len(scs):
        raise ValueError(f"config.json has {len(cfg['disks'])} disks, storage list has {len(scs)}")
    disks = []
    for disk, sc in zip(cfg["disks"], scs, strict=True):
        disk |= {"path": sc["path"], "queue_size": 512, "direct": _disk_direct(sc)}
        disks.append(dict(sorted(disk.items())))
    cfg |= {"disks": disks, "serial": {"mode": "Off"}, "console": {"mode": "Pty"}}
    if isinstance(cfg.get("cpus"), dict):
        cfg["cpus"] = dict(sorted((cfg["cpus"] | {"boot_vcpus": cpu}).items()))
    cfg["memory"] = dict(sorted((cfg["memory"] | {"size": memory}).items()))
    if memory < 256 * MIB:
        cfg.pop("balloon", None)
    elif isinstance(cfg.get("balloon"), dict):
        cfg["balloon"] = dict(sorted((cfg["balloon"] | {"size": memory // 4}).items()))
    else:
        cfg["balloon"] = {"size": memory // 4, "deflate_on_oom": True, "free_page_reporting": True}
    return go_json(dict(sorted(cfg.items())))


def _replace_paths(value: Any, moves: Mapping[str, str], key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _replace_paths(v, moves, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_replace_paths(v, moves) for v in value]
    if key in ("path", "disk_path") and isinstance(value, str):
        return moves.get(value, value)
    return value


def _blob_ids(value: Any) -> set[str]:
    return set(value) if isinstance(value, list | dict) else set()


def _vm_record(vm: NodeVM, image: JSON, vm_dir: str, scs: list[JSON], boot: JSON, blob_ids: set[str]) -> JSON:
    """A vms.json record (§4), keys in cocoon's struct order; ``image`` = image/image_digest/image_type."""
    config = {"name": vm.name, "cpu": vm.cpu, "memory": vm.memory, "storage": vm.storage} | image
    if vm.network:
        config["network"] = vm.network
    nets = []
    for i, nic in enumerate(vm.nics):
        tap, mac = _tap_mac(vm.id, i, nic)
        net: JSON = {
            "tap": tap,
            "mac": mac,
            "num_queues": max(2, 2 * vm.cpu),
            "queue_size": 512,
            "backend": "cni",
            "netns_path": f"/var/run/netns/cocoon-{vm.id}",
        }
        if nic.ip is not None:
            net["network"] = {"ip": nic.ip, "gateway": nic.gateway, "prefix": nic.prefix}
        nets.append(net)
    record: JSON = {
        "id": vm.id,
        "hypervisor": "cloud-hypervisor",
        "state": vm.state,
        "config": config,
        "pid": 0,
        "socket_path": f"{vm_dir}/api.sock",
        "network_configs": nets,
        "storage_configs": scs,
        "first_booted": vm.state == "running",
        "created_at": "2026-05-14T09:30:00Z",
        "updated_at": "2026-05-14T09:30:02Z",
    }
    if not nets:
        del record["network_configs"]
    if vm.state == "running":
        record |= {
            "pid": 1000 + int(hashlib.sha256(vm.id.encode()).hexdigest()[:4], 16),
            "started_at": "2026-05-14T09:30:01Z",
        }
    if vm.started_by == "restore":
        record["snapshot_ids"] = {vm.snapshot_id: {}}
    record |= {
        "boot_config": boot,
        "image_blob_ids": {h: {} for h in sorted(blob_ids)},
        "run_dir": vm_dir,
        "log_dir": f"/var/log/cocoon/cloudhypervisor/{vm.id}",
    }
    return record


@dataclass(frozen=True)
class OwnerRecord:
    """cocoonplan's ownership entry for one VM (the fields of ``cocoonplan.observed.Owner``).

    ``AS_WRITTEN`` takes the value from what :func:`node_root` wrote for that VM:
    ``config_sha256`` the sha256 of its run dir ``config.json`` (clones only), ``launch`` its
    run dir ``cmdline`` file, ``cmdline`` its record's ``boot_config.cmdline``. None omits the key.
    """

    name: str
    source: str
    spec_file: str | None = None
    config_sha256: str | _Default | None = None
    launch: str | _Default | None = None
    cmdline: str | _Default | None = None


OWNED_FILE = "cocoonplan/owned.json"


def _owner_entry(
    node: _Node, vm_id: str, record: JSON | None, owner: OwnerRecord | Mapping[str, Any]
) -> JSON:
    """One ``owned.json`` entry; a plain mapping is written as given (malformed ones included)."""
    if not isinstance(owner, OwnerRecord):
        return dict(owner)

    def written(what: str) -> str | None:
        if record is None:
            raise ValueError(f"owned[{vm_id}]: AS_WRITTEN {what} needs a VM with that ID")
        if what == "cmdline":
            return str(record["boot_config"]["cmdline"])
        path = node.host(f"{record['run_dir']}/{'config.json' if what == 'config_sha256' else 'cmdline'}")
        if what == "launch" and record["state"] != "running":
            return None  # a stopped VM has no launch line to record
        if not path.is_file():
            raise ValueError(f"owned[{vm_id}]: VM {vm_id} has no {path.name} for AS_WRITTEN {what}")
        data = path.read_bytes()
        return "sha256:" + hashlib.sha256(data).hexdigest() if what == "config_sha256" else data.decode()

    entry: JSON = {"name": owner.name, "spec_file": owner.spec_file, "source": owner.source}
    for what in ("config_sha256", "launch", "cmdline"):
        value = getattr(owner, what)
        entry[what] = written(what) if value is AS_WRITTEN else value
    return {key: value for key, value in entry.items() if value is not None}


@dataclass(frozen=True)
class _Node:
    """Where a node root is written: ``path`` stands for ``root_dir``; ``run_dir`` lies under it."""

    path: Path
    root_dir: str
    run_dir: str

    def host(self, abs_path: str) -> Path:
        """The file under ``path`` for an absolute node path (parent dirs created)."""
        if not abs_path.startswith(self.root_dir + "/"):
            raise ValueError(f"{abs_path} is outside root_dir {self.root_dir}")
        out = self.path / abs_path.removeprefix(self.root_dir + "/")
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def write(self, abs_path: str, data: bytes) -> None:
        self.host(abs_path).write_bytes(data)


def _pull_images(node: _Node, images: Mapping[str, Artifact], pulled_at: str) -> None:
    """EROFS blobs, boot files and images.json, as ``cocoon image pull`` leaves them (§3)."""
    index: JSON = {}
    for ref, art in sorted(images.items()):
        kernel, initrd = art.boot_layers()
        size = 0
        for blob in art.layers:
            erofs = node.host(f"{node.root_dir}/oci/blobs/{blob.hex}.erofs")
            if not erofs.exists():
                erofs_from_layer(blob, erofs)
            size += erofs.stat().st_size
        for boot_layer, name, data in ((kernel, "vmlinuz", boot_files(kernel)[0]),
                                       (initrd, "initrd.img", boot_files(initrd)[1])):  # fmt: skip
            node.write(f"{node.root_dir}/oci/boot/{boot_layer.hex}/{name}", data or b"")
            size += len(data or b"")
        index[ref] = {
            "ref": ref,
            "manifest_digest": art.digest,
            "layers": [{"digest": b.digest} for b in art.layers],
            "kernel_layer": kernel.digest,
            "initrd_layer": initrd.digest,
            "size": size,
            "created_at": pulled_at,
        }
    node.write(f"{node.root_dir}/oci/db/images.json", go_json({"images": index}))


def _run_vm(node: _Node, vm: NodeVM, image_ref: str, images: Mapping[str, Artifact]) -> JSON:
    """A ``vm run`` VM: its record fields, plus its ``cmdline`` file (no config.json, §5.7)."""
    art = images[image_ref]
    vm_dir = f"{node.run_dir}/cloudhypervisor/{vm.id}"
    layers = [_hex(h) for h in (vm.layers or [b.hex for b in art.layers])]
    kernel_hex, initrd_hex = (b.hex for b in art.boot_layers())
    known = {b.hex: b for a in images.values() for b in a.layers}
    for h in layers:  # a substituted layer set boots the last kernel/initrd it holds
        kernel, initrd = boot_files(known[h]) if h in known else (None, None)
        kernel_hex, initrd_hex = (h if kernel else kernel_hex), (h if initrd else initrd_hex)
    scs = storage_configs(layers, vm_dir, vm.data_disks, node.root_dir)
    boot = {
        "kernel_path": f"{node.root_dir}/oci/boot/{kernel_hex}/vmlinuz",
        "initrd_path": f"{node.root_dir}/oci/boot/{initrd_hex}/initrd.img",
        "cmdline": build_cmdline(len(layers), vm.name, vm.nics),
    }
    if vm.started_by == "restore":
        # `vm restore` copies the VM's own snapshot into its run dir and relaunches from it.
        source = SourceVM(id=vm.id, name=vm.name, cpu=vm.cpu, memory=vm.memory, storage=vm.storage,
                          nics=vm.nics, host_cpus=vm.host_cpus)  # fmt: skip
        ch_config = _ch_config(source, scs, boot["kernel_path"], boot["initrd_path"], boot["cmdline"])
        node.write(f"{vm_dir}/cocoon.json", go_json({"storage_configs": scs, "boot_config": boot}))
        node.write(f"{vm_dir}/config.json", go_json(dict(sorted(ch_config.items()))))
        node.write(f"{vm_dir}/state.json", go_json({"id": vm.id}))
    restored = vm.started_by == "restore"
    _write_launch(node, vm, vm_dir, None if restored else ch_cli_args(vm, vm_dir, scs, boot))
    config = {"image": image_ref, "image_digest": art.digest, "image_type": "oci"}
    return _vm_record(vm, config, vm_dir, scs, boot, {*layers, kernel_hex, initrd_hex})


def _write_launch(node: _Node, vm: NodeVM, vm_dir: str, cold_boot: Sequence[str] | None) -> None:
    """The run dir's ``cmdline``: absent unless running; the cold-boot arguments after ``vm run``
    or ``vm start``, else (``None``: a clone or a restore) the API socket alone."""
    if vm.state != "running":
        node.host(f"{vm_dir}/cmdline")  # the run dir stays (with the disks), without the file
        return
    line = f"cloud-hypervisor --api-socket {vm_dir}/api.sock" if cold_boot is None else " ".join(cold_boot)
    node.write(f"{vm_dir}/cmdline", line.encode())


def _clone_vm(node: _Node, vm: NodeVM, snap: Artifact) -> JSON:
    """A ``vm clone`` VM (§8.3-8.8): its record fields, plus the copied and patched run files."""
    vm_dir = f"{node.run_dir}/cloudhypervisor/{vm.id}"
    snap_cfg = json.loads(snap.config.data)
    mine = (vm.cpu, vm.memory, vm.storage, len(vm.nics))
    theirs = (snap_cfg["cpu"], snap_cfg["memory"], snap_cfg["storage"], snap_cfg.get("nics", 0))
    if any(m < t for m, t in zip(mine, theirs, strict=True)):
        raise ValueError(f"clone {vm.name}: cpu, memory, storage and nics must be >= the snapshot's")
    files = {name: snap.file(name) for name in ("cocoon.json", "config.json", "state.json")}
    blob_ids = _blob_ids(snap_cfg.get("imageBlobIds"))
    layers = tuple(_hex(h) for h in vm.layers or ())
    if vm.layers is not None and (snap.snapshot is None or layers != snap.snapshot.layers):
        if snap.snapshot is None:
            raise ValueError("substituting a clone's layers needs a snapshot built by ocifixture.snapshot()")
        # the stale-local-snapshot case: the snapshot files on the node name other layers
        files = _snapshot_files(snap.snapshot, layers)
        blob_ids = {*layers, snap.snapshot.kernel_hex, snap.snapshot.initrd_hex}
    scs = json.loads(files["cocoon.json"])["storage_configs"]
    moves = {}
    for sc in scs:
        new = {"cow": f"{vm_dir}/cow.raw", "data": f"{vm_dir}/data-{sc['serial']}.raw"}.get(sc["role"])
        if new is not None:
            moves[sc["path"]], sc["path"] = new, new
    patched = patch_ch_config(files["config.json"], scs, vm.cpu, vm.memory)
    state = go_json(_replace_paths(json.loads(files["state.json"]), moves))
    payload = json.loads(patched)["payload"]
    boot = {
        "kernel_path": payload["kernel"],
        "initrd_path": payload["initramfs"],
        "cmdline": build_cmdline(sum(sc["role"] == "layer" for sc in scs), vm.name, vm.nics),
    }
    sidecar = files["cocoon.json"]
    if vm.started_by == "restore":
        # `vm restore` of a snapshot of the clone itself: its sidecar names the clone's own disks,
        # and CH's VmConfig has the clone's NICs (hot-added after the clone's restore, so CH
        # numbered them after the snapshot's) but still the source's payload: the guest was
        # resumed from the source's memory and never cold-booted.
        cfg = json.loads(patched)
        first = len(cfg["disks"]) + len(cfg.get("net") or ())
        template = (cfg.get("net") or [{}])[0]
        cfg["net"] = [
            template
            | dict(zip(("tap", "mac"), _tap_mac(vm.id, i, nic), strict=True))
            | {"id": f"_net{first + i}"}
            for i, nic in enumerate(vm.nics)
        ] or None
        patched = go_json(cfg)
        sidecar = go_json({"storage_configs": scs, "boot_config": boot})
    node.write(f"{vm_dir}/cocoon.json", sidecar)
    node.write(f"{vm_dir}/config.json", patched)
    node.write(f"{vm_dir}/state.json", state)
    _write_launch(node, vm, vm_dir, ch_cli_args(vm, vm_dir, scs, boot) if vm.started_by == "start" else None)
    config = {"image": snap_cfg["image"], "image_digest": snap_cfg["imageDigest"], "image_type": "oci"}
    return _vm_record(vm, config, vm_dir, scs, boot, blob_ids)


def node_root(
    path: Path,
    *,
    images: Mapping[str, Artifact],
    vms: Sequence[NodeVM],
    root_dir: str = "/var/lib/cocoon",
    run_dir: str | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    pulled_at: str = "2026-05-13T08:01:12.41Z",
    owned: Mapping[str, OwnerRecord | Mapping[str, Any]] | None = None,
    snapshots: Mapping[str, JSON] | None = None,
) -> None:
    """Write a cocoon node root at ``path`` (which stands for ``root_dir``; ``run_dir`` must lie
    under it): images.json, EROFS blobs, boot files, vms.json, run dirs, snapshots.json (records
    by ID from ``snapshots``),
    cocoonplan's ``owned.json`` when ``owned`` (VM ID -> owner) is given, then ``extra_files``
    (path relative to ``root_dir`` -> bytes)."""
    node = _Node(path, root_dir, run_dir or f"{root_dir}/run")
    _pull_images(node, images, pulled_at)
    records = {}
    for vm in vms:
        if isinstance(vm.source, Run):
            records[vm.id] = _run_vm(node, vm, vm.source.image, images)
        else:
            records[vm.id] = _clone_vm(node, vm, vm.source.snapshot)
    names = {vm.name: vm.id for vm in vms}
    vms_doc = {"vms": dict(sorted(records.items())), "names": dict(sorted(names.items()))}
    node.write(f"{root_dir}/cloudhypervisor/db/vms.json", go_json(vms_doc))
    snapshot_names = {r["name"]: i for i, r in (snapshots or {}).items() if r.get("name")}
    node.write(
        f"{root_dir}/snapshot/db/snapshots.json",
        go_json({"snapshots": dict(snapshots or {}), "names": snapshot_names}),
    )
    if owned is not None:
        entries = {i: _owner_entry(node, i, records.get(i), o) for i, o in sorted(owned.items())}
        document = {"format_version": 1, "vms": entries}
        node.write(
            f"{root_dir}/{OWNED_FILE}", json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        )
    for rel, data in sorted((extra_files or {}).items()):
        node.write(f"{root_dir}/{rel}", data)


# --------------------------------------------------------------------------- export archives


def export_tar(snap: Artifact, *, name: str | None = None, version: int = 1) -> bytes:
    """The ``cocoon snapshot export`` tar of a snapshot artifact (§6.7, §6.5): ``snapshot.json``
    (``{"config": SnapshotConfig, "version": 1}``, indented, newline, 0644) first, then the files
    in name order; a file with a ``sparseMap`` is written as its data segments with the
    ``COCOON.sparse.map``/``COCOON.sparse.size`` PAX records. ``name`` overrides the snapshot's
    name (default: none, as a pulled snapshot has)."""
    cfg: JSON = json.loads(snap.config.data)
    blob_ids = cfg.get("imageBlobIds") or {}
    snapshot_config: JSON = {
        "cpu": cfg.get("cpu"),
        "memory": cfg.get("memory"),
        "storage": cfg.get("storage"),
        "image": cfg.get("image"),
        "image_digest": cfg.get("imageDigest"),
        "image_type": cfg.get("imageType"),
        "network": cfg.get("network"),
        "windows": cfg.get("windows"),
        "id": cfg.get("snapshotId"),
        "name": name or "",
        "description": cfg.get("description"),
        "image_blob_ids": {h: {} for h in sorted(blob_ids)},
        "hypervisor": cfg.get("hypervisor"),
        "nics": cfg.get("nics"),
    }
    snapshot_config = {k: v for k, v in snapshot_config.items() if v or k == "name"}
    envelope = go_json({"config": snapshot_config, "version": version}, indent=True) + b"\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("snapshot.json")
        info.mode, info.size, info.mtime = 0o644, len(envelope), 0
        tar.addfile(info, io.BytesIO(envelope))
        files = cfg.get("files") or {}
        for title in sorted(files):
            meta, data = files[title], snap.file(title)
            info = tarfile.TarInfo(title)
            info.mode, info.size, info.mtime = int(meta.get("mode", 0o644)), len(data), 0
            if "sparseMap" in meta:
                info.pax_headers = {
                    "COCOON.sparse.map": meta["sparseMap"],
                    "COCOON.sparse.size": str(meta["sparseSize"]),
                }
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
