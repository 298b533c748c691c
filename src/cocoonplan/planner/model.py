"""The plan: what cocoonplan decided, as frozen data with a versioned JSON form.

Apply (a later capability) executes exactly what a plan says. Fields documented as
"for display only" explain the plan and must never drive apply.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any

from pydantic import AliasChoices, Field

from cocoonplan.cocoon import DiskRole
from cocoonplan.errors import CocoonplanError
from cocoonplan.model import Digest, Mode, Model
from cocoonplan.observed import NicAddress, ObservedVM
from cocoonplan.project import HypervisorBuild
from cocoonplan.releases import CocoonVersion
from cocoonplan.resolved import EntryKind, PinnedRef
from cocoonplan.spec import PowerState, RestoreMode

FORMAT_VERSION = 2
"""Bumped when a field is removed, renamed or changes type or meaning; a field added keeps it
(readers ignore what they do not know). 2: typed ``changes[]`` and ``drift[]``."""


class Action(StrEnum):
    """What apply will do to a VM; values are the JSON wire strings."""

    NO_OP = "no-op"
    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"
    START = "start"
    """``cocoon vm start``: the VM exists as planned but is not running."""
    STOP = "stop"
    """``cocoon vm stop``: the VM exists as planned but its spec says stopped."""
    UNKNOWN = "unknown"
    """The node's state is not known: nothing can be decided, and apply refuses the plan."""


SYMBOLS: dict[Action, str] = {
    Action.NO_OP: " ",
    Action.CREATE: "+",
    Action.UPDATE: "~",
    Action.REPLACE: "-/+",
    Action.DELETE: "-",
    Action.START: ">",
    Action.STOP: "||",
    Action.UNKNOWN: "?",
}
"""The one table of Terraform-style symbols per action."""


class ActionReason(StrEnum):
    """Why a VM gets its action, as a closed vocabulary beside the prose ``reason``; values
    are the wire strings."""

    CREATE_BECAUSE_ABSENT = "create_because_absent"
    REPLACE_BECAUSE_LAYERS_DRIFTED = "replace_because_layers_drifted"
    """The VM runs on other layers than its source's (the founding bug)."""
    REPLACE_BECAUSE_SOURCE_CHANGED = "replace_because_source_changed"
    REPLACE_BECAUSE_RESOURCES_CHANGED = "replace_because_resources_changed"
    REPLACE_BECAUSE_CONFIG_CHANGED = "replace_because_config_changed"
    START_BECAUSE_STOPPED = "start_because_stopped"
    STOP_BECAUSE_SPEC_STOPPED = "stop_because_spec_stopped"
    DELETE_BECAUSE_SPEC_REMOVED = "delete_because_spec_removed"
    NO_OP_AS_PLANNED = "no_op_as_planned"
    UNKNOWN_BECAUSE_NODE_STATE_UNKNOWN = "unknown_because_node_state_unknown"
    UNKNOWN_BECAUSE_VM_STATE = "unknown_because_vm_state"
    """cocoon records the VM as ``creating`` or ``error``."""
    REFRESH_ONLY = "refresh_only"


class ConfigOrigin(StrEnum):
    """Where a planned ``config`` comes from; values are the wire strings."""

    WRITTEN = "written"
    """cocoon writes this ``config.json`` into the run directory (clones): it is the artifact."""
    DERIVED = "derived"
    """cocoon writes no ``config.json`` (fresh runs start from arguments): this is the VmConfig
    the launch arguments give Cloud Hypervisor, derived for review. The launch is the artifact."""


class BlobKind(StrEnum):
    """What a planned blob is; values are the wire strings."""

    LAYER = "layer"
    """An OCI image layer, converted to ``<root>/oci/blobs/<hex>.erofs`` on the node."""
    SNAPSHOT_FILE = "snapshot-file"
    """A file of a snapshot artifact (cocoon.json, config.json, cow.raw, memory-ranges, …)."""
    SNAPSHOT_CONFIG = "snapshot-config"
    """A snapshot artifact's config blob: the record ``snapshot import`` is given, and each
    file's mode and sparse map."""


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
    mount_point: str | None = None
    """Data disks: where the guest mounts it (cocoon's StorageConfig)."""
    fstype: str | None = None
    """Data disks: ``ext4`` or ``none``."""
    direct_io: bool | None = None
    """Data disks: the O_DIRECT override; None follows the VM's rule."""
    size: int | None = None
    """Data disks cocoon creates empty: their size in bytes (``--data-disk size=``); cocoon
    records no size, so it is never compared with the node."""


class PlannedNic(Model):
    """A NIC as the VM has it once running (for a clone: after the restore swapped its NICs)."""

    index: int
    tap: str
    mac: str
    num_queues: int
    queue_size: int
    address: NicAddress | None = None
    """The static address the network backend assigned; None when there is none or it is not known yet."""


class ApiRequest(Model):
    """One Cloud Hypervisor REST call cocoon makes on the VM's API socket."""

    endpoint: str
    """``vm.restore``, ``vm.remove-device``, ``vm.add-net``, ``vm.resume`` (``PUT /api/v1/<endpoint>``)."""
    body: dict[str, Any] | None = None


class PlannedBootFile(Model):
    """A kernel or initrd a VM boots from, extracted from a layer into ``<root>/oci/boot/<hex>/``."""

    path: str
    layer: Digest
    present: bool | None
    """On the node already; None when the node's state is not known."""


class PlannedImageRecord(Model):
    """The ``images.json`` entry a fresh run needs (``cocoon vm run`` looks images up there)."""

    key: str
    """The entry's key: an existing one, else the digest reference cocoon's own pulls use."""
    manifest_digest: Digest
    layers: tuple[Digest, ...]
    kernel_layer: Digest
    initrd_layer: Digest
    present: bool | None
    """An entry of this manifest digest is on the node already; None when not known."""


class LocalSnapshot(Model):
    """A snapshot already in the node's snapshot store that the clone's settings come from."""

    id: str
    name: str


class FileExpect(StrEnum):
    """What a spec expects of a path in the VM's root filesystem; values are the wire strings."""

    PRESENT = "present"
    """``expect.files``: the path resolves (symbolic links followed) to something."""
    ABSENT = "absent"
    """``expect.absent``: nothing is at the path (a final symbolic link is not followed)."""


class FileVerdict(StrEnum):
    """How a file expectation fared; values are the wire strings."""

    HOLDS = "holds"
    FAILS = "fails"
    UNKNOWN = "unknown"
    """A layer the answer depends on could not be read, or a content hash was not computed."""


class FileSource(Model):
    """A layer that provides a path in the merged root of an image."""

    image: str
    """The image's reference (a label)."""
    digest: Digest
    """The image's manifest digest."""
    layer: int
    """Index of the layer, bottom first (``cocoon-layer<N>``)."""
    layer_digest: Digest


class FileCheck(Model):
    """One ``expect.files``/``expect.absent`` entry checked against a stack of layers merged top
    down as overlayfs merges them (whiteouts, opaque directories, symbolic links)."""

    path: str
    expect: FileExpect
    sha256: str | None = None
    """The content hash the spec expects."""
    mode: str | None = None
    """The permission bits the spec expects, in octal."""
    verdict: FileVerdict
    found: bool | None
    """Whether the merged root holds the path; None when that is not known."""
    kind: EntryKind | None = None
    """What the path is (what it resolves to, for ``present``)."""
    resolved: str | None = None
    """The path it resolves to through symbolic links, when that differs from ``path``."""
    layer: int | None = None
    """Index of the layer providing it, bottom first (``cocoon-layer<N>``)."""
    layer_digest: Digest | None = None
    found_mode: str | None = None
    found_sha256: str | None = None
    """Regular files: the content's sha256, when this check asks for one and the layer's content was read."""
    provided_by: tuple[FileSource, ...] = ()
    """For a path missing here: the layers of other known images that provide it."""
    message: str
    """The finding in words. For display only."""


class DesiredVM(Model):
    """What a spec compiles to: the VM as it must run, before it is compared with the node."""

    name: str
    node: str
    mode: Mode
    spec_file: str | None
    """Where the spec was written (relative to the project); None for a VM no spec defines."""
    vm_id: str
    """The cocoon VM ID: the node's for a VM that stays, else a provisional one (see ``provisional``)."""
    state: PowerState
    """The power state the VM is to be left in."""
    source: PinnedRef | None
    """The snapshot (clone) or image (run) the VM comes from; None only for a VM on a node
    whose record names none."""
    base_image: PinnedRef | None
    """Clone mode: the image the snapshot was baked from, by the digest it recorded."""
    cpu: int
    memory: int
    storage: int
    nics: int
    network: str
    """cocoon network (CNI conflist) name; empty when the spec leaves it to a node default that is not known here."""
    interfaces: tuple[PlannedNic, ...]
    blobs: tuple[PlannedBlob, ...]
    disks: tuple[PlannedDisk, ...]
    boot_files: tuple[PlannedBootFile, ...] = ()
    image_record: PlannedImageRecord | None = None
    """Run mode: the images.json entry ``cocoon vm run`` finds the image by."""
    local_snapshot: LocalSnapshot | None = None
    """Clone mode: the node's snapshot record whose queue sizes and direct I/O the clone inherits."""
    config: dict[str, Any]
    """The complete Cloud Hypervisor VmConfig; ``config_origin`` says whether cocoon writes it."""
    config_origin: ConfigOrigin
    cmdline: str
    """The guest kernel command line cocoon records (``cocoon.layers`` top layer first). For a
    clone, the one recorded for its next cold boot: the resumed guest keeps its source's."""
    launch: tuple[str, ...]
    """The ``cloud-hypervisor`` argument list cocoon starts the VM with (its ``cmdline`` file
    holds it space-joined)."""
    restore: tuple[ApiRequest, ...] = ()
    """Clone mode: the REST calls after the launch that turn the snapshot into this VM."""
    restore_mode: RestoreMode | None = None
    """Clone mode: how the guest memory is restored (cocoon's ``--restore-mode``; v0.3.8 ``--on-demand``)."""
    provisional: tuple[str, ...] = ()
    """Paths of values cocoon or CNI choose at create time (ID, MACs, TAPs, addresses, run-dir
    paths and everything derived from them): shown as cocoonplan expects them, bound after apply."""
    notes: tuple[str, ...] = ()
    """What a reviewer must know about this VM's plan. For display only."""
    warnings: tuple[str, ...] = Field(default=(), exclude=True)
    """Where cocoon will not do what the spec asks (and warns when it runs). Not part of the
    VM's entry: ``make_plan`` lifts them into the plan's ``warnings``, attributed to the VM."""
    files: tuple[FileCheck, ...] = Field(default=(), exclude_if=lambda checks: not checks)
    """``expect.files`` and ``expect.absent`` checked against the planned layers, in spec order;
    left out of the document for a VM that expects none, so its plan and digest stay as they were."""


class ChangeKind(StrEnum):
    """The resource area a change is in; values are the wire strings."""

    SOURCE = "source"
    """The snapshot (clone) or image (run) digest."""
    MODE = "mode"
    RESOURCES = "resources"
    """``cpu``, ``memory``, ``storage``, ``nics``."""
    NETWORK = "network"
    DISK = "disk"
    """A disk, named by its serial: ``["disks", "cocoon-layer2"]``."""
    BLOB = "blob"
    """A layer blob the VM gains or loses: ``["blobs", "sha256:…"]``."""
    CONFIG = "config"
    """A field of ``config.json``; its ``disks`` list is keyed by serial, as disks are."""
    CMDLINE = "cmdline"
    """A kernel command-line parameter: ``["cmdline", "cocoon.layers"]``."""
    LAUNCH = "launch"
    """An option of the ``cloud-hypervisor`` arguments: ``["launch", "--disk", "cocoon-cow", "num_queues"]``."""


class ChangeOp(StrEnum):
    """What happens at a change's path; values are the wire strings."""

    ADD = "add"
    """New: ``before`` is meaningless (null)."""
    REMOVE = "remove"
    """Goes away: ``after`` is meaningless (null)."""
    UPDATE = "update"
    """Changes value (null is a value here)."""
    MOVE = "move"
    """A disk at another index (``before.index`` → ``after.index``), whatever else changed."""


PathPart = str | int
ChangePath = tuple[PathPart, ...]


def dotted(path: ChangePath) -> str:
    """A path as people read it: ``("config", "net", 0, "id")`` → ``config.net[0].id``."""
    text = str(path[0]) if path else ""
    for part in path[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


class Change(Model):
    """One difference between the node and the plan, typed."""

    kind: ChangeKind
    path: ChangePath
    """Where, as a tuple: ``["cpu"]``, ``["disks", "cocoon-cow"]``, ``["config", "disks", "db", "path"]``."""
    op: ChangeOp
    before: Any = None
    """The node's value (not for ``add``)."""
    after: Any = None
    """The planned value (not for ``remove``)."""
    cause: ChangePath | None = None
    """The ``path`` of the change this one follows from (a layer swap owns its blob and
    ``config.json`` lines; ``cpu`` owns each disk's ``num_queues``); None for a change that
    stands on its own. Renders show only the latter unless asked for everything."""


class DriftKind(StrEnum):
    """What kind of drift; values are the wire strings."""

    LAYER = "layer"
    """A layer the VM runs on is not its source's, or one is missing (the founding bug)."""
    LAUNCH = "launch"
    """The running VMM's arguments are none cocoon would start it with."""
    APPLIED = "applied"
    """A file differs from what cocoonplan applied (``config.json``, ``cmdline``)."""
    FILE = "file"
    """A path the spec expects (``expect.files``/``expect.absent``) fails on the layers the VM
    on the node really has."""


class Drift(Model):
    """Something on the node that differs from what it should be running, whatever the spec says."""

    kind: DriftKind
    path: ChangePath
    """``["disks", 2]`` (a layer by index), ``["launch"]``, ``["config.json"]``, ``["cmdline"]``
    or ``["files", "/usr/local/bin/agent.sh"]``."""
    expected: Any
    """What the VM's snapshot or image (or what cocoonplan applied) says should be there; None if nothing."""
    found: Any
    """What the node has; None when it is missing."""
    found_in: tuple[str, ...] = ()
    """For an alien layer: every image on the node (images.json) that contains it; for a
    missing file: each image layer that provides it (``<image> layer <N>``)."""
    message: str
    """The finding in words. For display only."""
    changes: tuple[Change, ...] = ()
    """Launch drift: the options that differ from the nearest form cocoon would start it with."""
    file: FileCheck | None = None
    """File drift: the check as it fared on the node's layers."""


class NodeDrift(Drift):
    """A VM's drift in the plan's top-level ``drift[]``: every drifted VM in one place."""

    vm: str
    node: str


class VMPlan(DesiredVM):
    """The plan for one VM: its desired form, the action, and why."""

    action: Action
    action_reason: ActionReason
    reason: str
    """Why this action, in words. For display only: apply must never branch on it."""
    destroys: tuple[str, ...] = ()
    """What a replace or delete throws away with the VM: its memory state, cow and data disks."""
    replace_paths: tuple[str, ...] = ()
    """The top-level fields of the changes that stand on their own (``disks``, ``cpu``, …):
    what forces a replace, as cocoon cannot change them on a VM."""
    changes: tuple[Change, ...] = ()
    drift: tuple[Drift, ...] = ()
    observed_id: str | None = None
    """The ID of the VM of this name on the node: the one a replace or delete removes (a
    replace's own ``vm_id`` is the new VM's); None when there is none."""
    observed_state: str | None = None
    """The state cocoon records for the VM on the node (``running``, ``stopped``, …); None when absent or unknown."""
    observed_fingerprint: Digest | None = None
    """sha256 of the VM's observed state this plan was made from; None for a VM not on the node."""
    observed: ObservedVM | None = Field(default=None, exclude_if=lambda record: record is None)
    """The node's record of a VM this plan changes (starts, stops, replaces, deletes), as the
    plan read it (``observed_fingerprint`` is its hash), so that apply can name what changed on
    the node since; left out of the document for every other VM, so its plan stays as it was."""
    fetch_bytes: int
    """Bytes to download: the sum of the sizes of blobs not present (0 unless created or replaced)."""


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

    @classmethod
    def from_error(
        cls, error: CocoonplanError, *, vm: str | None = None, file: str | None = None
    ) -> Diagnostic:
        """The diagnostic of a raised error, attributed to a VM and its spec file."""
        return cls(summary=error.summary, detail=error.detail, hint=error.hint, vm=vm, file=file)


class Summary(Model):
    """Counts for the summary line."""

    create: int = 0
    update: int = 0
    replace: int = 0
    delete: int = 0
    start: int = 0
    stop: int = 0
    unknown: int = 0
    no_op: int = Field(
        default=0, validation_alias=AliasChoices("no-op", "no_op"), serialization_alias="no-op"
    )
    fetch_bytes: int = 0
    fetch_blobs: int = 0
    errors: int = 0
    drifted: int = 0


class PlannedNode(Model):
    """A node as the plan was made for it."""

    name: str
    cocoon: CocoonVersion | None
    """The cocoon release the node's VMs were planned for, and how it was learnt; None when
    neither its release nor its state is known."""
    cloud_hypervisor: HypervisorBuild
    state_known: bool
    """Whether the node's state was read (else its VMs are ``unknown``)."""


class Plan(Model):
    """The whole plan: every VM, lock changes, errors and a summary."""

    format_version: int = FORMAT_VERSION
    tool_version: str
    refresh_only: bool = False
    """A refresh-only plan reports drift and proposes no action."""
    nodes: tuple[PlannedNode, ...] = ()
    complete: bool = True
    """Every spec was planned: no errors, no VM whose action is unknown."""
    applyable: bool = True
    """``cocoonplan apply`` would carry this plan out (complete, and not refresh-only)."""
    vms: tuple[VMPlan, ...]
    drift: tuple[NodeDrift, ...] = ()
    """Every VM's drift in one place, node by node (the entries of ``vms[].drift``)."""
    lock_changes: tuple[LockChange, ...] = ()
    errors: tuple[Diagnostic, ...] = ()
    warnings: tuple[Diagnostic, ...] = ()
    summary: Summary
    project: str | None = Field(default=None, pattern=r"^[^/]", exclude_if=lambda path: path is None)
    """Where the plan's project directory is, relative to the directory of the file
    ``plan --out`` wrote, so that ``apply FILE`` finds it from anywhere; absent when it is that
    directory (and in plans never written to a file). Relative: plans carry no absolute path."""
    digest: Digest | None = None
    """sha256 of this document's canonical JSON without this field: the plan's identity."""

    @property
    def has_changes(self) -> bool:
        """Whether anything would change or drifted: an action, a lock change, or drift."""
        return (
            bool(self.lock_changes)
            or any(vm.action is not Action.NO_OP for vm in self.vms)
            or any(vm.drift for vm in self.vms)
        )

    def content_digest(self) -> str:
        """The digest this plan must carry: sha256 of the compact JSON of everything but
        ``digest`` itself, keys in the models' order (which a reader re-validating the document
        reproduces) with ``vms`` last, hashed VM by VM so that the document is never whole in
        memory."""
        head = self.model_dump_json(by_alias=True, exclude={"digest", "vms"})
        hasher = hashlib.sha256(head[:-1].encode() + b',"vms":[')
        for at, vm in enumerate(self.vms):
            hasher.update((b"," if at else b"") + vm.model_dump_json(by_alias=True).encode())
        hasher.update(b"]}")
        return "sha256:" + hasher.hexdigest()
