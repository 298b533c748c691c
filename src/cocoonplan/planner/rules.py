"""What cocoon does differently per release line, as one table the planner consults.

Each field names one behaviour that changed between v0.3.8 (``cocoon-formats.md``) and the
v0.6.x line (``cocoon-later.md``, cited per field); the planner branches on these fields,
never on a version string.
"""

from __future__ import annotations

from dataclasses import dataclass

from cocoonplan.errors import StateError
from cocoonplan.project import HypervisorBuild
from cocoonplan.releases import CocoonLine
from cocoonplan.resolved import NodeView


@dataclass(frozen=True)
class Rules:
    """The behaviours of one cocoon line that shape a plan."""

    line: CocoonLine
    clone_resizes: bool
    """``vm clone --cpu/--memory/--storage`` exist (v0.3.8); removed in v0.4.0 (PR #27)."""
    clone_patches_resources: bool
    """The clone patch sets ``cpus.boot_vcpus``, ``memory.size`` and ``balloon`` (v0.3.8 §8.6);
    the later patch does not (patch.go)."""
    restore_taps: bool
    """The clone patch renames ``net[i].tap`` to ``rm<ID8>-<i>`` and sets ``vsock.socket`` (PR #142)."""
    nic_ids: bool
    """``vm.add-net`` carries ``id: cocoon-net-<mac>`` (later args.go); v0.3.8 lets CH pick ``_netN``."""
    restore_modes: bool
    """``--restore-mode copy|ondemand|mmap`` with default ``mmap`` (PRs #127, #159); v0.3.8 has
    ``--on-demand`` only."""
    vsock: bool
    """``vm run`` adds ``--vsock cid=3,socket=<run>/vsock.uds`` (later args.go)."""
    hugepages_from_host: bool
    """Hugepages follow the host's ``nr_hugepages`` (v0.3.8); later only ``--hugepages`` (PR #158)."""
    queue_affinity_planned: bool
    """Writable disks get ``queue_affinity`` queue i → CPU i (v0.3.8); later it is picked from
    live host load at every launch (PR #235), so a plan cannot know it."""
    qcow2_direct_io: bool
    """A writable qcow2 overlay (a cloud image's COW disk) gets O_DIRECT like any writable disk
    (v0.3.8 §5.7); later ``effectiveDirectIO`` leaves it off unless the disk's own override
    says otherwise, since CH applies O_DIRECT to the shared backing file too (§2.6, args.go)."""


# Oldest line first: a VM may still run as an earlier line launched it.
RULES = {
    CocoonLine.V0_3: Rules(
        line=CocoonLine.V0_3,
        clone_resizes=True,
        clone_patches_resources=True,
        restore_taps=False,
        nic_ids=False,
        restore_modes=False,
        vsock=False,
        hugepages_from_host=True,
        queue_affinity_planned=True,
        qcow2_direct_io=True,
    ),
    CocoonLine.V0_6: Rules(
        line=CocoonLine.V0_6,
        clone_resizes=False,
        clone_patches_resources=False,
        restore_taps=True,
        nic_ids=True,
        restore_modes=True,
        vsock=True,
        hugepages_from_host=False,
        queue_affinity_planned=False,
        qcow2_direct_io=False,
    ),
}


def rules_for(view: NodeView) -> Rules:
    """The rules of the node's cocoon line; a node whose release is not known (its state is not
    known either, so its VMs are only shown) is shown as v0.3.8 would run them."""
    return RULES[view.cocoon.line if view.cocoon else CocoonLine.V0_3]


def hypervisor_build(view: NodeView) -> HypervisorBuild:
    """The node's Cloud Hypervisor build: its ``cloudHypervisor`` setting, else what its exported
    state records (``state export --cloud-hypervisor``), else ``upstream``: assuming a stock
    build costs only the mmap fast path, assuming the fork wrongly fails clones on the node.

    A setting and a state that name different builds is a StateError: one of them is stale.
    """
    setting = view.settings.cloud_hypervisor
    recorded = view.state.cloud_hypervisor if view.state else None
    if setting is not None and recorded is not None and setting is not recorded:
        raise StateError(
            f"node {view.name}: cloudHypervisor says {setting}, and its exported state says {recorded}",
            hint=f"set cloudHypervisor for {view.name} to the build the node runs, or export its state "
            f"again with --cloud-hypervisor {setting}",
        )
    return setting or recorded or HypervisorBuild.UPSTREAM
