"""Observed state: what a cocoon node runs and holds, read from its root or an exported document.

This is the document ``cocoonplan state export`` prints and what ``state:`` in the project
file may point at, so a plan can be made in PR review without access to the node. It is
secret-free by construction: it holds only the fields modelled here (cocoon never persists VM
users or passwords), a run dir's ``config.json`` only the keys of :data:`VM_CONFIG_SHAPE` (at
every depth), and the readers pass every string through :func:`redact_credentials` before
anything sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from ipaddress import AddressValueError, IPv4Address
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictInt

from cocoonplan.cocoon import BootConfig, DiskRole, MetadataEngine, SnapshotMeta, StorageConfig
from cocoonplan.model import NAME_PATTERN, Digest, Mode, Model, canonical_json, sha256_digest
from cocoonplan.project import HypervisorBuild

STATE_FORMAT_VERSION = 1
OWNERSHIP_FILE = "cocoonplan/owned.json"
"""Relative to the node's root dir: the VMs cocoonplan created there."""

ConfigShape = Mapping[str, "ConfigShape | None"]
"""The keys of a Cloud Hypervisor object, each mapped to the shape of its value: None for a
value (a scalar or a list of them), a shape for an object or a list of objects."""


def _keys(*names: str, **objects: ConfigShape) -> ConfigShape:
    """An object of CH's: ``names`` hold values (scalars, lists of them), ``objects`` objects or
    lists of objects of their own shape."""
    return dict.fromkeys(names) | objects


_BUCKET = _keys("size", "one_time_burst", "refill_time")
_RATE_LIMITER = _keys(bandwidth=_BUCKET, ops=_BUCKET)
_PCI = ("pci_segment", "id", "iommu")

VM_CONFIG_SHAPE: ConfigShape = _keys(
    "iommu", "landlock_enable", "pvpanic", "watchdog",
    balloon=_keys("size", "deflate_on_oom", "free_page_reporting"),
    console=_keys("file", "socket", "mode", "iommu"),
    cpus=_keys(
        "boot_vcpus", "max_vcpus", "kvm_hyperv", "max_phys_bits", "nested",
        topology=_keys("threads_per_core", "cores_per_die", "dies_per_package", "packages"),
        affinity=_keys("vcpu", "host_cpus"),
        features=_keys("amx"),
    ),
    debug_console=_keys("file", "mode", "iobase"),
    devices=_keys("path", *_PCI, "x_nv_gpudirect_clique"),
    disks=_keys(
        "path", "readonly", "direct", "num_queues", "queue_size", "vhost_user", "vhost_socket",
        "serial", "rate_limit_group", "backing_files", "sparse", "image_type", *_PCI,
        "disable_aio", "disable_io_uring",  # serialised by CH, not in its OpenAPI document
        rate_limiter_config=_RATE_LIMITER,
        queue_affinity=_keys("queue_index", "host_cpus"),
    ),
    fs=_keys("tag", "socket", "num_queues", "queue_size", "pci_segment", "id"),
    landlock_rules=_keys("path", "access"),
    memory=_keys(
        "size", "hotplug_size", "hotplugged_size", "mergeable", "hotplug_method", "shared",
        "hugepages", "hugepage_size", "prefault", "thp",
        zones=_keys(
            "id", "size", "file", "mergeable", "shared", "hugepages", "hugepage_size",
            "host_numa_node", "hotplug_size", "hotplugged_size", "prefault",
        ),
    ),
    net=_keys(
        "tap", "ip", "mask", "mac", "host_mac", "mtu", "num_queues", "queue_size", "vhost_user",
        "vhost_socket", "vhost_mode", "offload_tso", "offload_ufo", "offload_csum", *_PCI,
        "fds",  # serialised by CH, not in its OpenAPI document
        rate_limiter_config=_RATE_LIMITER,
    ),
    numa=_keys(
        "guest_numa_id", "cpus", "memory_zones", "pci_segments", "device_id",
        distances=_keys("destination", "distance"),
    ),
    payload=_keys("firmware", "kernel", "cmdline", "initramfs", "igvm", "host_data"),
    pci_segments=_keys("pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight"),
    platform=_keys(
        "num_pci_segments", "iommu_segments", "iommu_address_width", "serial_number", "uuid",
        "oem_strings", "tdx", "sev_snp",
    ),
    pmem=_keys("file", "size", "discard_writes", *_PCI),
    rate_limit_groups=_keys("id", rate_limiter_config=_RATE_LIMITER),
    rng=_keys("src", "iommu"),
    serial=_keys("file", "socket", "mode", "iommu"),
    tpm=_keys("socket"),
    # Serialised by CH (UserDeviceConfig), not in its OpenAPI document.
    user_devices=_keys("socket", "id", "pci_segment"),
    vdpa=_keys("path", "num_queues", *_PCI),
    vsock=_keys("cid", "socket", *_PCI),
)  # fmt: skip
"""Cloud Hypervisor v51's ``VmConfig`` as CH serialises it into a snapshot's ``config.json``
(``vmm/src/vm_config.rs``), at every level: the properties of ``VmConfig`` and of each object
below it in CH's OpenAPI document, plus the keys CH serialises that the document leaves out.

Written out, not read from the OpenAPI document: that is test data, never shipped (a test
checks the two agree). A run dir's config.json is whatever is on the node; a key outside
these, at any depth (a token another tool put there, a linked docker config's ``auths``), is
no part of a VmConfig, so it is dropped rather than exported, diffed or rendered."""

VM_CONFIG_KEYS = frozenset(VM_CONFIG_SHAPE)
"""The top-level keys of :data:`VM_CONFIG_SHAPE`."""

_REDACTED = "REDACTED"
_CREDENTIALS = (
    # The userinfo of a URL (https://user:token@host/): a cloud image URL, a cloud-init seed
    # URL on a kernel cmdline.
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@"), rf"\1{_REDACTED}@"),
    # systemd credentials handed to a guest on its kernel cmdline…
    (re.compile(r'(\bsystemd\.set_credential(?:_binary)?=)(?:"[^"]*"|\S+)'), rf"\1{_REDACTED}"),
    # …or in an SMBIOS OEM string (CH's platform.oem_strings), which is the whole string.
    (re.compile(r"(\bio\.systemd\.credential(?:\.binary)?:).+"), rf"\1{_REDACTED}"),
)


def redact_credentials(value: Any) -> Any:
    """``value`` (parsed JSON or text) with every credential its strings carry, keys included
    (errors quote them), replaced by ``REDACTED``; idempotent."""
    if isinstance(value, str):
        for pattern, replacement in _CREDENTIALS:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {redact_credentials(key): redact_credentials(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_credentials(item) for item in value]
    return value


def _shaped(value: Any, shape: ConfigShape | None) -> Any:
    """``value`` with only the keys of ``shape`` at every depth: an object where a value
    belongs keeps none, and a value where an object belongs is dropped by the caller."""
    if isinstance(value, list):
        return [_shaped(item, shape) for item in value]
    if not isinstance(value, dict):
        return value
    kept = {}
    for key, item in value.items():
        if key not in (shape or {}):
            continue
        inner = (shape or {})[key]
        if inner is not None and not isinstance(item, dict | list | None):
            continue  # a string where CH writes an object: nothing CH wrote
        kept[key] = _shaped(item, inner)
    return kept


def _vm_config_only(config: dict[str, Any] | None) -> dict[str, Any] | None:
    kept: dict[str, Any] | None = None if config is None else _shaped(config, VM_CONFIG_SHAPE)
    return kept


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json as a node's is observed: the VmConfig keys only (at every depth),
    credentials redacted."""
    kept: dict[str, Any] = redact_credentials(_vm_config_only(config))
    return kept


def _ipv4(value: str) -> str:
    # Checked, not converted: the string is what cocoon recorded and puts on the cmdline, and
    # IPv4Address accepts only the dotted form it prints (no spaces, colons or leading zeros).
    try:
        IPv4Address(value)
    except AddressValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 address") from exc
    return value


def _ipv4_or_empty(value: str) -> str:
    return value and _ipv4(value)


IPv4 = Annotated[str, AfterValidator(_ipv4)]
"""A dotted IPv4 address, kept as written: it becomes part of the ``ip=`` kernel parameter."""

MAC_PATTERN = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
TAP_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$"
"""A Linux interface name (at most 15 characters) of the characters cocoon's TAP names use:
nothing that could add an option to the ``--net`` value it is launched with."""


class NicAddress(Model):
    """A static address a network backend assigned (CNI IPAM); DHCP/bridge NICs have none.

    Each field lands in the guest's ``ip=<ip>::<gateway>:<netmask>:…`` kernel parameter, so
    each is checked where it is read: IPv4 addresses (the kernel's ``ip=`` takes no other;
    cocoon v0.6 gives IPv6 NICs none) and a prefix length of 0 to 32."""

    ip: IPv4
    gateway: Annotated[str, AfterValidator(_ipv4_or_empty)] = ""
    """Empty when the network backend gave none (``ip=<ip>:::<netmask>:…``)."""
    prefix: StrictInt = Field(ge=0, le=32)


class ObservedNic(Model):
    """One NIC of a VM record (cocoon's NetworkConfig)."""

    tap: str = Field(pattern=TAP_PATTERN)
    mac: str = Field(pattern=MAC_PATTERN)
    num_queues: int = 0
    queue_size: int = 0
    backend: str = ""
    network: NicAddress | None = None


class VMSettings(Model):
    """The ``config`` of a VM record: cocoon's VMConfig, as recorded."""

    name: str
    cpu: int = 0
    memory: int = 0
    storage: int = 0
    queue_size: int = 0
    disk_queue_size: int = 0
    image: str = ""
    image_digest: str = ""
    image_type: str = ""
    network: str = ""
    no_direct_io: bool = False
    windows: bool = False


class Owner(Model):
    """cocoonplan's record of a VM it created on the node."""

    name: str
    spec_file: str | None = None
    """The spec file (relative to the project) that defined the VM when it was applied."""
    source: Digest
    """The snapshot or image manifest digest it was created from."""
    source_ref: str | None = None
    """The snapshot or image reference as the spec wrote it (a label)."""
    mode: Mode | None = None
    """Clone or run, as applied; None in records written before cocoonplan recorded it."""
    config_sha256: Digest | None = None
    """sha256 of the config.json written at apply (clones)."""
    launch: str | None = None
    """The launch line written at apply."""
    cmdline: str | None = None
    """The kernel cmdline recorded at apply."""


class Building(Model):
    """An ``owned.json`` entry (keyed by VM name) written before apply asks cocoon to remove or
    create a VM: a ``kill -9`` after cocoon acted but before apply recorded the ID must not
    leave a VM cocoonplan made looking foreign. Cleared once the apply's ownership is recorded."""

    plan: Digest
    """The digest of the plan whose apply is building the VM."""
    owner: Owner
    """The ownership the VM gets once it is made."""
    id: str | None = None
    """The ID cocoon printed for it; None until it printed one."""


class ObservedVM(Model):
    """A VM on the node: its record in vms.json and the files of its run directory."""

    id: str
    name: str = Field(pattern=NAME_PATTERN)
    state: str
    hypervisor: str = ""
    settings: VMSettings
    storage_configs: tuple[StorageConfig, ...]
    boot_config: BootConfig | None = None
    nics: tuple[ObservedNic, ...] = ()
    image_blob_ids: tuple[str, ...] = ()
    snapshot_ids: tuple[str, ...] = ()
    """Snapshots taken from this VM (``snapshot save``); ``vm restore`` needs one of them, so a
    restored VM lists the one it was restored from (which one, its run directory does not say)."""
    run_dir: str = ""
    # Only the keys of VM_CONFIG_SHAPE are kept, at every depth, however the model is made.
    runtime_config: Annotated[dict[str, Any] | None, AfterValidator(_vm_config_only)] = None
    """``<run>/config.json`` (clones and restores only), key order kept."""
    runtime_config_sha256: Digest | None = None
    """sha256 of the ``config.json`` bytes as they are on the node."""
    runtime_meta: SnapshotMeta | None = None
    """``<run>/cocoon.json`` (clones and restores only)."""
    launch: str | None = None
    """``<run>/cmdline``: the launch line of the last start."""
    owner: Owner | None = None
    """Set when cocoonplan created this VM; None for VMs it must never touch."""

    def fingerprint(self) -> Digest:
        """sha256 of everything observed about this VM; apply refuses a plan made on another."""
        return sha256_digest(canonical_json(self.model_dump(mode="json")))

    @property
    def running(self) -> bool:
        """Whether cocoon records the VM as running (its runtime files then exist)."""
        return self.state == "running"

    @property
    def restored(self) -> bool:
        """Whether the run directory holds a snapshot of this very VM (``cocoon vm restore``).

        Clone and restore both copy a snapshot's ``cocoon.json`` into the run directory, and
        only its writable disks tell them apart: a snapshot of this VM names this VM's own
        run directory, a clone's names its source VM's (a clone's ID is drawn after its
        snapshot was taken, so no snapshot it was cloned from can name its run directory).
        cocoon v0.3.8 restores only a snapshot listed in ``snapshot_ids``.
        """
        if self.runtime_meta is None:
            return False
        own = self.run_dir.rstrip("/") + "/"
        writable = [c.path for c in self.runtime_meta.storage_configs if c.role is not DiskRole.LAYER]
        return bool(writable) and all(path.startswith(own) for path in writable)

    @property
    def resumes_another_guest(self) -> bool:
        """Whether the guest in the run directory's snapshot was booted with another kernel
        cmdline than this VM's record holds: the guest a clone resumed from its source.

        CH keeps the cmdline a guest booted with in every later snapshot's ``payload``, and
        cocoon does not patch it; a clone's record holds its own, rebuilt for its next cold
        boot. A VM booted from its own record (``vm run``, ``vm start``) has the two equal.
        """
        payload = (self.runtime_config or {}).get("payload")
        booted = payload.get("cmdline") if isinstance(payload, dict) else None
        recorded = self.boot_config.cmdline if self.boot_config else None
        return isinstance(booted, str) and recorded is not None and booted != recorded

    @property
    def mode(self) -> Mode:
        """Clone or run, on the best evidence: cocoonplan's record, its source digest, the run dir.

        A run's source is its image, so its recorded source digest is the record's
        ``image_digest``; a clone's is the snapshot's. Without a record, a run directory
        holding another VM's snapshot sidecar means a clone. One holding a snapshot of the VM
        itself (``vm restore``) says nothing of how the VM was made, whether it ran or was
        cloned before: its guest does. A clone whose guest was never cold-booted still runs
        its source's; one that was (``vm stop``/``vm start``) boots from its record as a run
        does, and nothing on the node tells it from one.
        """
        if self.owner is not None:
            if self.owner.mode is not None:
                return self.owner.mode
            return Mode.RUN if self.owner.source == self.settings.image_digest else Mode.CLONE
        if self.runtime_meta is None:
            return Mode.RUN
        if not self.restored:
            return Mode.CLONE
        return Mode.CLONE if self.resumes_another_guest else Mode.RUN


class ObservedImage(Model):
    """An entry of ``oci/db/images.json``."""

    ref: str
    manifest_digest: Digest
    layers: tuple[Digest, ...]
    kernel_layer: Digest | None = None
    initrd_layer: Digest | None = None


class ObservedSnapshot(Model):
    """An entry of ``snapshot/db/snapshots.json``."""

    id: str
    name: str = ""
    image: str = ""
    image_digest: str = ""
    image_blob_ids: tuple[str, ...] = ()
    queue_size: int = 0
    """The source VM's settings, which a clone inherits unless its flags override them."""
    disk_queue_size: int = 0
    no_direct_io: bool = False
    pending: bool = False
    """Still being written (an import or save in progress, or killed midway): not usable yet."""


class NodeState(Model):
    """Everything cocoonplan reads from one node; the exported state document."""

    format_version: Literal[1] = 1
    kind: Literal["cocoonplan/node-state"] = "cocoonplan/node-state"
    root_dir: str
    run_dir: str
    vms: tuple[ObservedVM, ...] = ()
    images: tuple[ObservedImage, ...] = ()
    snapshots: tuple[ObservedSnapshot, ...] = ()
    blobs: tuple[str, ...] = Field(default=())
    """Hexes of the layers whose EROFS conversion exists under ``oci/blobs``."""
    default_network: str | None = None
    """The conflist name cocoon records for a VM given no ``--network``, read from the CNI conf
    dir given to ``state export --cni-conf-dir``; None when not read or when it has none."""
    boot_files: tuple[str, ...] = ()
    """Boot files extracted from layers, as ``<layer hex>/vmlinuz`` or ``<layer hex>/initrd.img``."""
    metadata_engine: MetadataEngine | None = None
    """Where the root keeps its metadata; None for a root that holds none yet."""
    later_layout: bool = False
    """A JSON-metadata root written by a cocoon after v0.3.8 (``.prev`` generations, per-VM locks)."""
    cocoon_version: str | None = None
    """What ``cocoon version`` printed on the node when the state was exported; None when not run."""
    cloud_hypervisor: HypervisorBuild | None = None
    """The node's Cloud Hypervisor build, as given to ``state export --cloud-hypervisor``; None
    when not given (the node's ``cloudHypervisor`` setting, else ``upstream``, decides)."""
    recovered: tuple[str, ...] = ()
    """One line per JSON metadata file that did not decode and was read from its ``.prev``
    generation instead, as cocoon reads it (the newest commit may be lost): a warning."""

    def vm_named(self, name: str) -> ObservedVM | None:
        """The VM of that name on the node, if any."""
        return next((vm for vm in self.vms if vm.name == name), None)
