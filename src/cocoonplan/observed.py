"""Observed state: what a cocoon node runs and holds, read from its root or an exported document.

This is the document ``cocoonplan state export`` prints and what ``state:`` in the project
file may point at, so a plan can be made in PR review without access to the node. It is
secret-free by construction: it holds only the fields modelled here (cocoon never persists VM
users or passwords), a run dir's ``config.json`` only the keys of :data:`VM_CONFIG_KEYS`, and
the readers pass every string through :func:`redact_credentials` before anything sees it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from cocoonplan.cocoon import BootConfig, DiskRole, MetadataEngine, SnapshotMeta, StorageConfig
from cocoonplan.model import NAME_PATTERN, Digest, Mode, Model, canonical_json, sha256_digest

STATE_FORMAT_VERSION = 1
OWNERSHIP_FILE = "cocoonplan/owned.json"
"""Relative to the node's root dir: the VMs cocoonplan created there."""

VM_CONFIG_KEYS = frozenset(
    {
        "balloon", "console", "cpus", "debug_console", "devices", "disks", "fs", "iommu",
        "landlock_enable", "landlock_rules", "memory", "net", "numa", "payload", "pci_segments",
        "platform", "pmem", "pvpanic", "rate_limit_groups", "rng", "serial", "tpm", "user_devices",
        "vdpa", "vsock", "watchdog",
    }
)  # fmt: skip
"""The top-level keys of Cloud Hypervisor v51's ``VmConfig`` as CH serialises it into a
snapshot's ``config.json`` (``vmm/src/vm_config.rs``): every property of ``VmConfig`` in CH's
OpenAPI document, plus ``user_devices``, which CH serialises and the document leaves out.

Written out, not read from the OpenAPI document: that is test data, never shipped (a test
checks the two agree). A run dir's config.json is whatever is on the node; a key outside
these (a token another tool put there, a linked docker config's ``auths``) is no part of a
VmConfig, so it is dropped rather than exported, diffed or rendered."""

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


def _vm_config_only(config: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if config is None else {k: v for k, v in config.items() if k in VM_CONFIG_KEYS}


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json as a node's is observed: the VmConfig keys only, credentials redacted."""
    kept: dict[str, Any] = redact_credentials(_vm_config_only(config))
    return kept


class NicAddress(Model):
    """A static address a network backend assigned (CNI IPAM); DHCP/bridge NICs have none."""

    ip: str
    gateway: str = ""
    prefix: int


class ObservedNic(Model):
    """One NIC of a VM record (cocoon's NetworkConfig)."""

    tap: str
    mac: str
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
    """Snapshots taken from this VM (``snapshot save``); ``vm restore`` needs one of them."""
    run_dir: str = ""
    # Only the keys of VM_CONFIG_KEYS are kept, however the model is made.
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
        run directory, a clone's names its source VM's.
        """
        if self.runtime_meta is None:
            return False
        own = self.run_dir.rstrip("/") + "/"
        writable = [c.path for c in self.runtime_meta.storage_configs if c.role is not DiskRole.LAYER]
        return bool(writable) and all(path.startswith(own) for path in writable)

    @property
    def mode(self) -> Mode:
        """Clone or run, on the best evidence: cocoonplan's record, its source digest, the run dir.

        A run's source is its image, so its recorded source digest is the record's
        ``image_digest``; a clone's is the snapshot's. Without a record, a run directory
        holding another VM's snapshot sidecar means a clone.
        """
        if self.owner is not None:
            if self.owner.mode is not None:
                return self.owner.mode
            return Mode.RUN if self.owner.source == self.settings.image_digest else Mode.CLONE
        return Mode.CLONE if self.runtime_meta is not None and not self.restored else Mode.RUN


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

    def vm_named(self, name: str) -> ObservedVM | None:
        """The VM of that name on the node, if any."""
        return next((vm for vm in self.vms if vm.name == name), None)
