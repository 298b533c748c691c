"""What one boot is made of: the disks in order, the root's kernel arguments, the expectations.

A target is taken either from a plan (the disks and ``cmdline`` cocoonplan would give the VM)
or from a node's VM record (the disks and ``cmdline`` cocoon really runs it with), so the same
proof answers "will the plan give the VM its files?" and "does the VM on the node have them?".
"""

from __future__ import annotations

from enum import StrEnum

from cocoonplan.cocoon import BLOB_PATH, DiskRole
from cocoonplan.errors import ProofError
from cocoonplan.model import Digest, Model
from cocoonplan.observed import ObservedVM
from cocoonplan.planner.model import VMPlan
from cocoonplan.spec import Expectations, ExpectedFile

ROOT_ARGUMENTS = ("cocoon.layers", "cocoon.cow")
"""The kernel parameters that decide the root filesystem. The rest of a cocoon command line is
for cocoon's own initramfs and hardware (``console=hvc0``, ``clocksource=kvm-clock``, ``ip=``
for a NIC the proof machine does not have), so it is not given to the proof guest."""


class DiskSet(StrEnum):
    """Whose disks a boot is of; values are the wire strings."""

    PLANNED = "planned"
    """The disks and command line the plan lists for the VM."""
    ON_NODE = "on-node"
    """The disks and command line the node's record of the VM holds."""


class TargetDisk(Model):
    """One disk of a boot, in the order the VM gets it."""

    serial: str
    role: DiskRole
    readonly: bool
    layer: Digest | None = None
    """The layer blob (``role: layer``); other disks are booted as blank scratch."""


class Probe(Model):
    """A path the guest looks up in its root, numbered so its answer cannot be mistaken."""

    index: int
    path: str
    hash: bool
    """Whether the guest hashes the file (an expectation with ``sha256``)."""


class BootTarget(Model):
    """One VM's boot: its disks, the root's kernel arguments and what its root must hold."""

    node: str
    vm: str
    disk_set: DiskSet
    disks: tuple[TargetDisk, ...]
    kernel_args: tuple[str, ...]
    """``cocoon.layers=…`` and ``cocoon.cow=…``, as the command line spells them."""
    files: tuple[ExpectedFile, ...] = ()
    absent: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``node/vm``, for messages."""
        return f"{self.node}/{self.vm}"

    @property
    def layers(self) -> tuple[str, ...]:
        """The layer digests, in disk order (bottom first)."""
        return tuple(d.layer for d in self.disks if d.layer is not None)

    def probes(self) -> tuple[Probe, ...]:
        """Every path to look up: the expected files, then the paths expected absent."""
        paths = [(f.path, f.sha256 is not None) for f in self.files] + [(p, False) for p in self.absent]
        return tuple(Probe(index=i, path=path, hash=hash_) for i, (path, hash_) in enumerate(paths))


def root_arguments(cmdline: str, vm: str) -> tuple[str, ...]:
    """The ``cocoon.layers=`` and ``cocoon.cow=`` tokens of ``cmdline``, exactly one of each."""
    tokens = tuple(t for t in cmdline.split() if t.partition("=")[0] in ROOT_ARGUMENTS)
    if sorted(t.partition("=")[0] for t in tokens) != sorted(ROOT_ARGUMENTS):
        raise ProofError(
            f"VM {vm}: its kernel command line does not hold one cocoon.layers= and one cocoon.cow=",
            detail=cmdline,
            hint="only a VM booted from OCI layers (cocoon-overlay) can be proven by boot",
        )
    return tokens


def planned_target(vm: VMPlan, expect: Expectations | None) -> BootTarget:
    """The boot of the disks and command line the plan lists for ``vm``."""
    disks = tuple(
        TargetDisk(
            serial=d.serial,
            role=d.role,
            readonly=d.readonly,
            layer=d.digest if d.role is DiskRole.LAYER else None,
        )
        for d in sorted(vm.disks, key=lambda d: d.index)
    )
    return _target(vm.node, vm.name, DiskSet.PLANNED, disks, root_arguments(vm.cmdline, vm.name), expect)


def node_target(node: str, vm: ObservedVM, root_dir: str, expect: Expectations | None) -> BootTarget:
    """The boot of the disks and command line node ``node`` records for ``vm`` (its root dir
    ``root_dir``): a layer disk is named by the ``oci/blobs/<hex>.erofs`` file it is."""
    disks = []
    for config in vm.storage_configs:
        layer = None
        if config.role is DiskRole.LAYER:
            match = BLOB_PATH.fullmatch(config.path)
            if match is None or match.group("root") != root_dir.rstrip("/"):
                raise ProofError(
                    f"VM {vm.name} on node {node}: layer disk {config.serial} is {config.path}, "
                    f"not a layer file of the node's {root_dir}/oci/blobs",
                    hint="only layers cocoon pulled can be booted from the node's root",
                )
            layer = f"sha256:{match.group('hex')}"
        disks.append(TargetDisk(serial=config.serial, role=config.role, readonly=config.ro, layer=layer))
    cmdline = vm.boot_config.cmdline if vm.boot_config else None
    if not cmdline:
        raise ProofError(
            f"VM {vm.name} on node {node} records no kernel command line",
            hint="cocoon records one for every VM it boots from OCI layers; check its vms.json record",
        )
    return _target(node, vm.name, DiskSet.ON_NODE, tuple(disks), root_arguments(cmdline, vm.name), expect)


def _target(
    node: str,
    vm: str,
    disk_set: DiskSet,
    disks: tuple[TargetDisk, ...],
    kernel_args: tuple[str, ...],
    expect: Expectations | None,
) -> BootTarget:
    return BootTarget(
        node=node,
        vm=vm,
        disk_set=disk_set,
        disks=disks,
        kernel_args=kernel_args,
        files=expect.files if expect else (),
        absent=expect.absent if expect else (),
    )
