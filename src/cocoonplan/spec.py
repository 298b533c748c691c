"""The VM spec: what a user writes in a GitOps repo, validated with file:line:column errors.

Field names follow cocoon's CocoonSet / vk-cocoon vocabulary (``snapshot``, ``image``,
``backend``, ``cpu``, ``memory``, ``storage``, ``nics``, ``network``, ``noDirectIO``,
``dataDisks[]{name, size, fstype, mount, directio}``). Values are checked against cocoon's
own rules (``VMConfig.Validate``, ``normalizeDataDiskSpecs``) so a spec that cocoon would
refuse never reaches a plan.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from cocoonplan.cocoon import (
    MIN_MEMORY,
    MIN_STORAGE,
    NETWORK_NAME,
    NicCount,
    QueueSize,
    VCpus,
    normal_path,
)
from cocoonplan.errors import ReferenceFormatError
from cocoonplan.model import NAME_PATTERN, Model
from cocoonplan.oci.reference import Reference, parse_reference
from cocoonplan.units import MAX_SIZE, MIB, parse_size

VM_KIND = "VM"
MIN_DATA_DISK = 16 * MIB
DATA_DISK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,19}$")

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)? ?[kKmMgGtTpP]?[iI]?[bB]?$"},
                {"type": "integer", "minimum": 0, "maximum": MAX_SIZE},
            ],
            "description": "bytes, or a number with a binary unit as cocoon reads it (1G = 1073741824)",
        }
    ),
]


class Backend(StrEnum):
    """The hypervisor a VM runs on; values are cocoon's wire strings."""

    CLOUD_HYPERVISOR = "cloud-hypervisor"
    FIRECRACKER = "firecracker"


class PowerState(StrEnum):
    """Whether the VM should be running; values are cocoon's record states for the two."""

    RUNNING = "running"
    STOPPED = "stopped"


class RestoreMode(StrEnum):
    """How a clone's guest memory is restored (``--restore-mode``; v0.3.8: ``--on-demand`` or not)."""

    COPY = "copy"
    """The whole memory file is read before the guest resumes (no ``memory_restore_mode``)."""
    ONDEMAND = "ondemand"
    """Pages are faulted in on first use (``memory_restore_mode: OnDemand``)."""
    MMAP = "mmap"
    """The memory file is mapped copy-on-write (``CopyOnWrite``): cocoon v0.6's default, which
    only cocoonstack's Cloud Hypervisor build accepts."""


class FsType(StrEnum):
    """Filesystem cocoon formats a data disk with; ``none`` leaves it raw."""

    EXT4 = "ext4"
    NONE = "none"


class DirectIO(StrEnum):
    """cocoon's ``--data-disk directio=``: ``auto`` applies the default rule."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"


class DataDisk(Model):
    """A data disk cocoon creates beside the COW disk (``--data-disk``)."""

    name: str
    """Disk name; also its virtio serial. ``^[a-z][a-z0-9_-]{0,19}$``, not ``cocoon-…``."""
    size: Size
    """Size of the sparse disk file; at least 16 MiB."""
    fstype: FsType = FsType.EXT4
    """``ext4`` (formatted and mounted) or ``none`` (left raw)."""
    mount: str | None = None
    """Guest mount point; defaults to ``/mnt/<name>`` for ext4, must be empty for ``none``."""
    directio: DirectIO = DirectIO.AUTO
    """O_DIRECT override for this disk; ``auto`` follows ``noDirectIO``."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not DATA_DISK_NAME.fullmatch(name) or name.startswith("cocoon-"):
            raise ValueError(
                f"data disk name {name!r} must match ^[a-z][a-z0-9_-]{{0,19}}$ and not start with cocoon-"
            )
        return name

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: int) -> int:
        if size < MIN_DATA_DISK:
            raise ValueError(f"data disk size {size} bytes is below cocoon's minimum of 16M")
        return size

    @field_validator("mount")
    @classmethod
    def _check_mount_point(cls, mount: str | None) -> str | None:
        # Checked, not normalized: cocoon records the mount point as given.
        if mount:
            normal_path(mount)
        return mount

    @model_validator(mode="after")
    def _check_mount(self) -> DataDisk:
        if self.fstype is FsType.NONE and self.mount:
            raise ValueError("a data disk with fstype none cannot have a mount point")
        return self

    @property
    def mount_point(self) -> str:
        """The mount point cocoon records: the given one, else ``/mnt/<name>`` unless ``none``."""
        if self.mount is not None:
            return self.mount
        return "" if self.fstype is FsType.NONE else f"/mnt/{self.name}"


MAX_EXPECTED_PATHS = 1024
"""Paths one spec may expect; the proof reads every layer's listing once, whatever the count."""
_MODE = re.compile(r"^0?[0-7]{3,4}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _guest_path(path: str) -> str:
    """An absolute, normal path in the guest's root: no ``.``/``..`` part, no empty one."""
    if not path.startswith("/") or path == "/":
        raise ValueError(f"{path!r} must be an absolute path below /")
    parts = path.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or not path.isprintable():
        raise ValueError(f"{path!r} must be a normal path (no empty, . or .. parts, printable characters)")
    return "/" + "/".join(parts)


GuestPath = Annotated[str, Field(max_length=4096), AfterValidator(_guest_path)]


class ExpectedFile(Model):
    """A path that must exist in the VM's root filesystem, optionally with content and mode."""

    path: GuestPath
    """Absolute path in the guest's merged root (``/usr/local/bin/agent.sh``)."""
    sha256: str | None = Field(default=None, pattern=_SHA256.pattern)
    """Hex sha256 of a regular file's content."""
    mode: str | None = Field(default=None, pattern=_MODE.pattern)
    """Permission bits in octal (``"0755"``), compared without the file type."""


class Expectations(Model):
    """Facts the resolved inputs must match, or the plan fails."""

    base_image: str | None = Field(default=None, alias="baseImage")
    """The image (by tag or digest) a cloned snapshot must have been baked from."""
    files: tuple[ExpectedFile, ...] = Field(default=(), max_length=MAX_EXPECTED_PATHS)
    """Paths that must exist in the VM's root filesystem (a bare string is a path)."""
    absent: tuple[GuestPath, ...] = Field(default=(), max_length=MAX_EXPECTED_PATHS)
    """Paths that must not exist in the VM's root filesystem."""

    @field_validator("files", mode="before")
    @classmethod
    def _bare_paths(cls, files: object) -> object:
        if isinstance(files, list | tuple):
            return [{"path": f} if isinstance(f, str) else f for f in files]
        return files

    @model_validator(mode="after")
    def _disjoint(self) -> Expectations:
        both = {f.path for f in self.files} & set(self.absent)
        if both:
            raise ValueError(f"{sorted(both)[0]} is expected both present and absent")
        return self

    model_config = Model.model_config | {"populate_by_name": True}

    @field_validator("base_image")
    @classmethod
    def _check_ref(cls, value: str | None) -> str | None:
        return _check_reference(value)


def _check_reference(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_reference(value)
        except ReferenceFormatError as exc:
            raise ValueError(exc.summary) from exc
    return value


class VMSpecBody(Model):
    """``spec`` of a VM document."""

    snapshot: str | None = None
    """Clone mode: the hot snapshot artifact to clone, by tag or digest."""
    image: str | None = None
    """Run mode: the OCI image to boot, by tag or digest."""
    node: str
    """The node (a name from ``cocoonplan.yaml``) the VM runs on."""
    backend: Backend = Backend.CLOUD_HYPERVISOR
    """Hypervisor; only ``cloud-hypervisor`` is planned for now."""
    state: PowerState = PowerState.RUNNING
    """Power state: a stopped VM keeps its disks and record (``cocoon vm stop``)."""
    cpu: VCpus | None = None
    """vCPUs; run default 2, clone default the snapshot's (and never below it)."""
    memory: Size | None = None
    """Guest memory; run default 1G, at least 512M; clone default the snapshot's."""
    storage: Size | None = None
    """COW disk size; run default 10G, at least 10G; clone default the snapshot's."""
    nics: NicCount | None = None
    """Number of NICs; run default 1, 0 for none; clone default the snapshot's."""
    network: str | None = Field(default=None, pattern=NETWORK_NAME)
    """cocoon network (CNI conflist) name; unset means the node's default."""
    queue_size: QueueSize | None = Field(default=None, alias="queueSize")
    """virtio-net queue size; cocoon's default 512."""
    disk_queue_size: QueueSize | None = Field(default=None, alias="diskQueueSize")
    """virtio-blk queue size; cocoon's default 512."""
    no_direct_io: StrictBool | None = Field(default=None, alias="noDirectIO")
    """Turn O_DIRECT off for writable disks; unset: off for runs, a local snapshot's setting for clones."""
    restore_mode: RestoreMode | None = Field(default=None, alias="restoreMode")
    """Clones only: how guest memory is restored; unset: cocoon's default for the node's version."""
    data_disks: tuple[DataDisk, ...] = Field(default=(), alias="dataDisks")
    """Run mode only: extra disks, after the COW disk, in this order."""
    expect: Expectations | None = None
    """Optional facts the resolved inputs must match."""

    model_config = Model.model_config | {"populate_by_name": True}

    @field_validator("snapshot", "image")
    @classmethod
    def _check_refs(cls, value: str | None) -> str | None:
        return _check_reference(value)

    @field_validator("backend")
    @classmethod
    def _only_cloud_hypervisor(cls, backend: Backend) -> Backend:
        if backend is Backend.FIRECRACKER:
            raise ValueError(
                "backend firecracker is not supported yet: cocoonplan plans Cloud Hypervisor VMs only; "
                "use backend: cloud-hypervisor"
            )
        return backend

    @field_validator("memory")
    @classmethod
    def _min_memory(cls, memory: int | None) -> int | None:
        if memory is not None and memory < MIN_MEMORY:
            raise ValueError(f"memory {memory} bytes is below cocoon's minimum of 512M")
        return memory

    @field_validator("storage")
    @classmethod
    def _min_storage(cls, storage: int | None) -> int | None:
        if storage is not None and storage < MIN_STORAGE:
            raise ValueError(f"storage {storage} bytes is below cocoon's minimum of 10G")
        return storage

    @model_validator(mode="after")
    def _one_source(self) -> VMSpecBody:
        if (self.snapshot is None) == (self.image is None):
            raise ValueError("give exactly one of snapshot (clone mode) or image (run mode)")
        if self.image is not None and self.restore_mode is not None:
            raise ValueError("restoreMode applies to clones only: a run boots fresh")
        if self.snapshot is not None and self.data_disks:
            raise ValueError("dataDisks cannot be set on a clone: cocoon clones the snapshot's data disks")
        if self.image is not None and self.expect and self.expect.base_image:
            raise ValueError("expect.baseImage applies to clones only; an image is its own base")
        names = [disk.name for disk in self.data_disks]
        if len(set(names)) != len(names):
            raise ValueError("data disk names must be unique")
        return self


class Metadata(Model):
    """``metadata`` of a VM document."""

    name: str = Field(pattern=NAME_PATTERN)
    """VM name, unique on its node (cocoon's ``^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$``)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Free-form labels, carried into the plan for display."""

    @field_validator("labels")
    @classmethod
    def _printable_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        # Labels are shown to reviewers: an escape sequence or line break has no place there.
        bad = [text for item in labels.items() for text in item if not text.isprintable()]
        if bad:
            raise ValueError(f"labels may hold printable characters only, not {bad[0]!r}")
        return labels


class VMSpec(Model):
    """One ``kind: VM`` document."""

    api_version: Literal["cocoonplan/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["VM"]
    metadata: Metadata
    spec: VMSpecBody

    model_config = Model.model_config | {"populate_by_name": True}

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.metadata.name

    @property
    def source(self) -> Reference:
        """The snapshot (clone) or image (run) reference, parsed."""
        return parse_reference(self.spec.snapshot or self.spec.image or "")


class LoadedSpec(Model):
    """A validated VM spec and where it was written."""

    spec: VMSpec
    file: str
    """The spec file, relative to the project directory (for messages and plans)."""
    line: int
    """Line where the document starts."""
