"""cocoon's own on-disk and registry formats, as read by cocoonplan.

These mirror cocoon v0.3.8 (``types/storage.go``, the snapshot sidecar ``cocoon.json``,
epoch's snapshot config blob). They ignore unknown keys on purpose: they describe files
written by other programs, whose later versions add fields (cocoon's later ``SnapshotMeta``
carries ``cpu`` and ``memory``); cocoonplan's own documents stay ``extra="forbid"``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from cocoonplan.units import GIB, MAX_SIZE, MIB

MIN_MEMORY = 512 * MIB
"""cocoon's ``VMConfig.Validate`` minimum, for runs and clones alike."""
MIN_STORAGE = 10 * GIB
"""cocoon's minimum COW disk size."""
MAX_VCPUS = 1024
"""KVM's ``KVM_MAX_VCPUS`` on x86-64 (Linux 5.15 on): Cloud Hypervisor cannot create more
vCPUs, so neither a VM nor a host (its ``--cpus max=``) may count more."""
MAX_NICS = 32
"""Cloud Hypervisor plugs every virtio device into PCI segment 0, whose 32 slots NICs share
with disks, rng, watchdog, balloon and console: more NICs cannot be plugged."""
MAX_QUEUE_SIZE = 32768
"""virtio's largest queue size (1.2, §2.7): Cloud Hypervisor refuses a larger one."""
NETWORK_NAME = r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$"
"""libcni's network name syntax (``ValidateNetworkName``); cocoon passes the name on."""
_PATH_PART = re.compile(r"[A-Za-z0-9._+@~-]+")

VCpus = Annotated[StrictInt, Field(ge=1, le=MAX_VCPUS)]
"""A vCPU or host CPU count; strict, so that ``true`` is not read as 1."""
NicCount = Annotated[StrictInt, Field(ge=0, le=MAX_NICS)]
QueueSize = Annotated[StrictInt, Field(ge=1, le=MAX_QUEUE_SIZE)]


def normal_path(path: str) -> str:
    """``path`` normalized, or ValueError: absolute, without ``..``, and made of characters
    that mean nothing in the launch line and option lists it is copied into (``path=…,``)."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must be an absolute path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r} must not contain ..")
    if not all(_PATH_PART.fullmatch(part) for part in parts):
        raise ValueError(f"{path!r} may hold only letters, digits and ._+@~- between its slashes")
    return "/" + "/".join(parts)


BLOB_PATH = re.compile(r"^(?P<root>/.*)/oci/blobs/(?P<hex>[0-9a-f]{64})\.erofs$")
BOOT_PATH = re.compile(r"^(?P<root>/.*)/oci/boot/(?P<hex>[0-9a-f]{64})/(?P<file>vmlinuz|initrd\.img)$")
COW_SERIAL = "cocoon-cow"
DEFAULT_QUEUE_SIZE = 512


class MetadataEngine(StrEnum):
    """Where a cocoon root keeps its metadata; values are the wire strings (cocoon's ``meta_backend``)."""

    JSON = "json"
    """``vms.json``, ``images.json``, ``snapshots.json``: v0.3.8, and later roots not yet converted."""
    SQLITE = "sqlite"
    """``meta/meta.db``: a root set up by a later release, or converted by ``cocoon meta convert``."""


class DiskRole(StrEnum):
    """A disk's role in cocoon's StorageConfig; values are the wire strings."""

    LAYER = "layer"
    COW = "cow"
    DATA = "data"
    CIDATA = "cidata"


class Wire(BaseModel):
    """Base of foreign formats: frozen, unknown keys ignored (see module docstring)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class StorageConfig(Wire):
    """One disk in cocoon's order: the unit of ``cocoon.json``, vms.json and the plan."""

    path: str
    ro: bool
    serial: str
    role: DiskRole
    mount_point: str | None = None
    fstype: str | None = None
    direct_io: bool | None = None


class BootConfig(Wire):
    """cocoon's BootConfig; every field is omitted on the wire when empty."""

    kernel_path: str | None = None
    initrd_path: str | None = None
    cmdline: str | None = None
    firmware_path: str | None = None


class SnapshotMeta(Wire):
    """A snapshot's ``cocoon.json`` sidecar: the disk list the clone will use, verbatim."""

    storage_configs: tuple[StorageConfig, ...]
    boot_config: BootConfig | None = None


class SnapshotFile(Wire):
    """One ``files`` entry of a snapshot config blob."""

    mode: StrictInt | None = Field(default=None, ge=0, le=0o7777)
    sparse_map: str | None = Field(default=None, alias="sparseMap")
    sparse_size: StrictInt | None = Field(default=None, alias="sparseSize", ge=0, le=MAX_SIZE)
    size: StrictInt | None = Field(default=None, ge=0, le=MAX_SIZE)


class SnapshotConfig(Wire):
    """The snapshot artifact's config blob (epoch ``manifest.SnapshotConfig``, camelCase)."""

    schema_version: str = Field(alias="schemaVersion")
    snapshot_id: str | None = Field(default=None, alias="snapshotId")
    description: str | None = None
    image: str | None = None
    image_digest: str | None = Field(default=None, alias="imageDigest")
    image_type: str | None = Field(default=None, alias="imageType")
    image_blob_ids: frozenset[str] = Field(default=frozenset(), alias="imageBlobIds")
    """A set of layer hexes, never an order: epoch writes ``{hex: {}}``, others a sorted array."""
    hypervisor: str | None = None
    # The source VM's settings, which cocoon accepted: epoch omits only zero values, which
    # no VM has, so cpu, memory and storage are required and held to cocoon's own bounds.
    cpu: VCpus
    memory: StrictInt = Field(ge=MIN_MEMORY, le=MAX_SIZE)
    storage: StrictInt = Field(ge=MIN_STORAGE, le=MAX_SIZE)
    nics: NicCount = 0
    network: str | None = Field(default=None, pattern=NETWORK_NAME)
    windows: StrictBool = False
    files: dict[str, SnapshotFile] = Field(default_factory=dict)
    created_at: str | None = Field(default=None, alias="createdAt")

    @field_validator("image_blob_ids", mode="before")
    @classmethod
    def _accept_object_or_array(cls, value: object) -> object:
        # epoch v0.3.8 writes a JSON object used as a set; the registry quoted in cocoon
        # issue #46 holds a sorted array. Both mean the same set.
        if isinstance(value, dict):
            return frozenset(value)
        return value


DATA_DISK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,19}$")
READ_ONLY_ROLES = (DiskRole.LAYER, DiskRole.CIDATA)


def storage_config_problems(configs: tuple[StorageConfig, ...]) -> list[tuple[int, str]]:
    """cocoon's ``ValidateStorageConfigs`` (§4 role rules), plus "at least one cow disk" (§8.5).

    Returns (disk index, problem) pairs, index -1 for the list as a whole; empty when cocoon
    would accept the list.
    """
    problems: list[tuple[int, str]] = []
    for index, config in enumerate(configs):
        wants_ro = config.role in READ_ONLY_ROLES
        if config.ro != wants_ro:
            problems.append(
                (index, f"a {config.role} disk must be {'read-only' if wants_ro else 'writable'}")
            )
        if config.role is not DiskRole.DATA:
            if config.direct_io is not None:
                problems.append((index, f"a {config.role} disk cannot carry direct_io"))
            continue
        if config.fstype not in ("ext4", "none"):
            problems.append(
                (index, f"data disk {config.serial} needs fstype ext4 or none, not {config.fstype!r}")
            )
        if config.fstype == "none" and config.mount_point:
            problems.append(
                (index, f"data disk {config.serial} has fstype none but mount point {config.mount_point}")
            )
        if config.mount_point:
            try:
                normal_path(config.mount_point)
            except ValueError:
                problems.append(
                    (index, f"data disk {config.serial} has an invalid mount point {config.mount_point!r}")
                )
        if not DATA_DISK_NAME.fullmatch(config.serial) or config.serial.startswith("cocoon-"):
            problems.append((index, f"data disk serial {config.serial!r} is not a valid data disk name"))
    if not any(c.role is DiskRole.COW for c in configs):
        problems.append((-1, "the disk list has no cow disk; a clone needs one"))
    return problems


def layer_hex(config: StorageConfig) -> str | None:
    """The OCI layer digest hex a layer disk's path names, or None if it is not a blob path."""
    match = BLOB_PATH.fullmatch(config.path)
    return match.group("hex") if match else None


def blob_path(root_dir: str, digest_hex: str) -> str:
    """Where cocoon keeps the EROFS conversion of an OCI layer."""
    return f"{root_dir.rstrip('/')}/oci/blobs/{digest_hex}.erofs"


def boot_path(root_dir: str, digest_hex: str, file: str) -> str:
    """Where cocoon keeps a boot file (``vmlinuz``, ``initrd.img``) extracted from a layer."""
    return f"{root_dir.rstrip('/')}/oci/boot/{digest_hex}/{file}"


def vm_run_dir(run_dir: str, vm_id: str) -> str:
    """A VM's run directory."""
    return f"{run_dir.rstrip('/')}/cloudhypervisor/{vm_id}"


def snapshot_import_name(digest: str) -> str:
    """The local name cocoonplan imports a snapshot artifact under: derived from its manifest
    digest, so a stale local snapshot of the same tag can never be taken for it (cocoon #46).
    63 characters, within cocoon's name syntax."""
    return "cocoonplan-" + digest.removeprefix("sha256:")[:52]


def layer_serial(index: int) -> str:
    """The virtio serial of base layer ``index`` (0 = bottom)."""
    return f"cocoon-layer{index}"
