"""The plan: what cocoonplan decided, as frozen data with a versioned JSON form.

Apply (a later capability) executes exactly what a plan says. Fields documented as
"for display only" explain the plan and must never drive apply.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import AliasChoices, Field

from cocoonplan.cocoon import DiskRole
from cocoonplan.model import Digest, Model
from cocoonplan.resolved import PinnedRef

FORMAT_VERSION = 1


class Action(StrEnum):
    """What apply will do to a VM; values are the JSON wire strings."""

    NO_OP = "no-op"
    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"


SYMBOLS: dict[Action, str] = {
    Action.NO_OP: " ",
    Action.CREATE: "+",
    Action.UPDATE: "~",
    Action.REPLACE: "-/+",
    Action.DELETE: "-",
}
"""The one table of Terraform-style symbols per action."""


class Mode(StrEnum):
    """How the VM comes to be: cloned from a hot snapshot, or booted fresh from an image."""

    CLONE = "clone"
    RUN = "run"


class BlobKind(StrEnum):
    """What a planned blob is; values are the wire strings."""

    LAYER = "layer"
    """An OCI image layer, converted to ``<root>/oci/blobs/<hex>.erofs`` on the node."""
    SNAPSHOT_FILE = "snapshot-file"
    """A file of a snapshot artifact (cocoon.json, config.json, cow.raw, memory-ranges, …)."""
    CONFIG = "config"
    """A manifest's config blob."""


class PlannedBlob(Model):
    """A blob the VM needs, and whether the node already has it."""

    digest: Digest
    size: int
    media_type: str
    source: str
    """Canonical repository the blob is fetched from."""
    present: bool
    """Already on the node (a layer whose EROFS conversion exists); present blobs are not fetched."""
    kind: BlobKind
    title: str | None = None
    """The file name of a snapshot file; None for layers."""


class PlannedDisk(Model):
    """One virtio-blk disk, in the order Cloud Hypervisor will see it."""

    index: int
    serial: str
    role: DiskRole
    path: str
    """Absolute path on the node."""
    readonly: bool
    digest: Digest | None
    """The layer blob (layers) or snapshot file (cloned cow/data disks) it is made from; None when created empty."""


class VMPlan(Model):
    """The plan for one VM."""

    name: str
    node: str
    mode: Mode
    action: Action
    reason: str
    """Why this action, in words. For display only: apply must never branch on it."""
    spec_file: str | None
    """Where the spec was written (relative to the project), None for a VM with no spec."""
    vm_id: str
    """The cocoon VM ID the VM runs (or will run) under."""
    source: PinnedRef
    """The snapshot (clone) or image (run) the VM comes from."""
    base_image: PinnedRef | None
    """Clone mode: the image the snapshot was baked from, by the digest it recorded."""
    cpu: int
    memory: int
    storage: int
    nics: int
    blobs: tuple[PlannedBlob, ...]
    fetch_bytes: int
    """Bytes to download: the sum of the sizes of blobs not present."""
    disks: tuple[PlannedDisk, ...]
    config: dict[str, Any]
    """The complete Cloud Hypervisor ``config.json`` (clone: as cocoon patches it; run: the equivalent VmConfig)."""
    cmdline: str
    """The guest kernel command line cocoon records (``cocoon.layers`` top layer first)."""
    launch: str
    """The ``cloud-hypervisor`` command line cocoon writes to the VM's ``cmdline`` file."""


class LockChange(Model):
    """A lock-file entry that is new or whose tag moved since it was locked."""

    ref: str
    before: Digest | None
    """The locked digest; None when the reference is not locked yet."""
    after: Digest
    """What the tag resolves to now."""


class Diagnostic(Model):
    """An error that kept part of the plan from being made."""

    summary: str
    detail: str = ""
    hint: str = ""
    vm: str | None = None
    file: str | None = None


class Summary(Model):
    """Counts for the summary line."""

    create: int = 0
    update: int = 0
    replace: int = 0
    delete: int = 0
    no_op: int = Field(
        default=0, validation_alias=AliasChoices("no-op", "no_op"), serialization_alias="no-op"
    )
    fetch_bytes: int = 0
    fetch_blobs: int = 0
    errors: int = 0


class Plan(Model):
    """The whole plan: every VM, lock changes, errors and a summary."""

    format_version: int = FORMAT_VERSION
    tool_version: str
    vms: tuple[VMPlan, ...]
    lock_changes: tuple[LockChange, ...] = ()
    errors: tuple[Diagnostic, ...] = ()
    summary: Summary

    @property
    def has_changes(self) -> bool:
        """Whether anything would change: an action other than no-op, or a lock change."""
        return bool(self.lock_changes) or any(vm.action is not Action.NO_OP for vm in self.vms)
