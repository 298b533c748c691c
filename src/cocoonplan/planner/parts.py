"""The pieces every desired VM is listed with: its blobs and its disks."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cocoonplan.cocoon import StorageConfig
from cocoonplan.errors import PlanError
from cocoonplan.model import digest_hex
from cocoonplan.observed import NodeState
from cocoonplan.planner.hypervisor import Tuning, net_queues
from cocoonplan.planner.identity import NicIdentity
from cocoonplan.planner.model import BlobKind, PlannedBlob, PlannedDisk, PlannedNic
from cocoonplan.planner.rules import Rules
from cocoonplan.project import HypervisorBuild, NodeConfig
from cocoonplan.resolved import BlobRef


@dataclass
class Memo:
    """What many VMs of one plan share, computed once per plan: each entry is a pure function
    of content-addressed inputs (a snapshot's digest, a node), so a plan of a thousand VMs over
    ten snapshots checks each snapshot once, not a thousand times."""

    provisional: dict[Hashable, tuple[str, ...]] = field(default_factory=dict)
    """Provisional paths by VM shape (see ``compile.fresh_vm``)."""
    layers: dict[Hashable, tuple[str, ...]] = field(default_factory=dict)
    """A snapshot's checked layer hexes, by snapshot digest, expected base and root dir."""
    blobs: dict[Hashable, tuple[PlannedBlob, ...]] = field(default_factory=dict)
    """A clone's planned blobs, by snapshot digest and the node's present layers."""


@dataclass(frozen=True)
class Target:
    """The node a VM is planned for, as the clone and run planners need it."""

    node: NodeConfig
    rules: Rules
    state: NodeState | None
    """None when the node's state is not known: nothing is present, nothing is missing."""
    default_network: str | None
    cloud_hypervisor: HypervisorBuild = HypervisorBuild.UPSTREAM
    """The node's Cloud Hypervisor build as ``rules.hypervisor_build`` decides it."""
    memo: Memo = field(default_factory=Memo, compare=False)


def check_host_cpus(vm: str, cpu: int, host_cpus: int) -> None:
    """cocoon refuses a VM with more vCPUs than the node has (``Create``); so does the plan."""
    if cpu > host_cpus:
        raise PlanError(
            f"VM {vm}: cpu {cpu} is more than the node's {host_cpus} CPUs",
            hint="lower cpu, or correct the node's cpus in cocoonplan.yaml",
        )


def layer_blobs(layers: Iterable[BlobRef], present: frozenset[str]) -> list[PlannedBlob]:
    """Image layers to fetch; a layer whose EROFS conversion is on the node is present."""
    # Built without validation: every value comes from a validated BlobRef of the same types.
    return [
        PlannedBlob.model_construct(
            digest=ref.digest,
            size=ref.size,
            media_type=ref.media_type,
            source=ref.source,
            present=digest_hex(ref.digest) in present,
            kind=BlobKind.LAYER,
        )
        for ref in layers
    ]


def planned_disk(index: int, disk: StorageConfig, digest: str | None, size: int | None = None) -> PlannedDisk:
    """One disk in the plan's terms: cocoon's StorageConfig, the blob it is made from (None when
    created empty) and, for a data disk cocoon creates, its size."""
    # Built without validation: the disk is a validated StorageConfig of the same field types,
    # ``digest`` a layer digest the planner made from checked hexes.
    return PlannedDisk.model_construct(
        index=index,
        serial=disk.serial,
        role=disk.role,
        path=disk.path,
        readonly=disk.ro,
        digest=digest,
        mount_point=disk.mount_point,
        fstype=disk.fstype,
        direct_io=disk.direct_io,
        size=size,
    )


def planned_disks(
    disks: Sequence[StorageConfig], digests: Sequence[str | None], sizes: Mapping[str, int] | None = None
) -> tuple[PlannedDisk, ...]:
    """The disks in hypervisor order; ``sizes`` by serial for the data disks cocoon creates."""
    return tuple(
        planned_disk(i, d, digest, (sizes or {}).get(d.serial))
        for i, (d, digest) in enumerate(zip(disks, digests, strict=True))
    )


def planned_nics(nics: Sequence[NicIdentity], tuning: Tuning) -> tuple[PlannedNic, ...]:
    """The VM's NICs as Cloud Hypervisor will have them, queues sized as cocoon sizes them."""
    return tuple(
        PlannedNic(
            index=i,
            tap=nic.tap,
            mac=nic.mac,
            num_queues=net_queues(tuning.cpu),
            queue_size=tuning.queue_size,
            address=nic.address,
        )
        for i, nic in enumerate(nics)
    )
