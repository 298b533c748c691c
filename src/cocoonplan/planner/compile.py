"""``make_plan``: resolved inputs in, a frozen plan out. Pure: no I/O, no clock, no globals."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

from cocoonplan.cocoon import DiskRole
from cocoonplan.errors import CocoonplanError, PlanError
from cocoonplan.model import Mode, Model
from cocoonplan.observed import ObservedVM
from cocoonplan.planner.clone import clone_nic_count, plan_clone
from cocoonplan.planner.diff import diff_vm, observed_disk, replace_paths
from cocoonplan.planner.drift import drift_of, file_drift_of
from cocoonplan.planner.files import file_drift, planned_files
from cocoonplan.planner.hypervisor import record_launch
from cocoonplan.planner.identity import Identity, fresh_identity, kept_identity
from cocoonplan.planner.model import (
    Action,
    ActionReason,
    Change,
    ConfigOrigin,
    DesiredVM,
    Diagnostic,
    Drift,
    DriftKind,
    LockChange,
    NodeDrift,
    Plan,
    PlannedNic,
    PlannedNode,
    Summary,
    VMPlan,
)
from cocoonplan.planner.parts import Memo, Target
from cocoonplan.planner.provisional import mark_host_chosen, mark_provisional, provisional_paths
from cocoonplan.planner.rules import hypervisor_build, rules_for
from cocoonplan.planner.run import plan_run, run_nic_count
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import NodeView, PinnedRef, ResolvedVM
from cocoonplan.spec import LoadedSpec, PowerState


class PlanInput(Model):
    """One VM's spec with everything it resolved to and the node it targets."""

    loaded: LoadedSpec
    resolved: ResolvedVM
    node: NodeConfig


def nic_count(item: PlanInput) -> int:
    """NICs the VM gets: a clone's at least its snapshot's."""
    snapshot = item.resolved.snapshot
    return clone_nic_count(item.loaded, snapshot) if snapshot else run_nic_count(item.loaded)


def compile_vm(item: PlanInput, identity: Identity, view: NodeView, memo: Memo | None = None) -> DesiredVM:
    """The desired VM of one spec under ``identity``; raises PlanError."""
    resolved = item.resolved
    rules = rules_for(view)
    target = Target(
        node=item.node,
        rules=rules,
        state=view.state,
        default_network=view.default_network,
        cloud_hypervisor=hypervisor_build(view),
        memo=memo or Memo(),
    )
    if resolved.snapshot is not None:
        planned = plan_clone(item.loaded, resolved, target, identity)
    else:
        assert resolved.image is not None  # a spec names exactly one of snapshot or image
        planned = plan_run(item.loaded, resolved.image, target, identity, resolved.present_blobs)
    # After the layers are settled: a snapshot that disagrees with itself is the first error.
    files = planned_files(item.loaded, resolved)
    return mark_host_chosen(planned.model_copy(update={"files": files}), rules)


def _shape(item: PlanInput, view: NodeView) -> Hashable:
    source = item.resolved.snapshot or item.resolved.image
    return (view.name, item.loaded.spec.spec, source.pinned.digest if source else None)


def fresh_vm(item: PlanInput, view: NodeView, memo: Memo | None = None) -> DesiredVM:
    """The VM as cocoon would create it now, with every value cocoon draws marked provisional.

    Which values cocoon draws depends on what the VM is made of (its spec but its name, its
    source, its node), never on its name: VMs of one shape are compiled under a second
    identity once per plan, not once each.
    """
    memo = memo or Memo()
    name, node, nics = item.loaded.spec.name, view.name, nic_count(item)
    planned = compile_vm(item, fresh_identity(node, name, nics), view, memo)
    key = _shape(item, view)
    if key not in memo.provisional:
        other = compile_vm(item, fresh_identity(node, name, nics, draw=1), view, memo)
        memo.provisional[key] = provisional_paths(planned, other)
    return mark_provisional(planned, memo.provisional[key])


def _decided(desired: DesiredVM, **decision: Any) -> VMPlan:
    """``desired`` with the planner's decision: built from values the planner made and
    validated already, so not validated again (a plan of thousands of VMs spends its time there)."""
    return VMPlan.model_construct(**dict(desired), **decision)


def _fetch_bytes(desired: DesiredVM) -> int:
    return sum(b.size for b in desired.blobs if not b.present)


def power_action(observed: str, wanted: PowerState) -> tuple[Action, ActionReason, str]:
    """What the VM's power state calls for, when nothing else differs."""
    if observed == "running":
        if wanted is PowerState.RUNNING:
            return Action.NO_OP, ActionReason.NO_OP_AS_PLANNED, "the node runs this VM as planned"
        return (
            Action.STOP,
            ActionReason.STOP_BECAUSE_SPEC_STOPPED,
            "the VM runs as planned, and its spec says stopped",
        )
    if observed in ("stopped", "created"):
        if wanted is PowerState.RUNNING:
            return (
                Action.START,
                ActionReason.START_BECAUSE_STOPPED,
                f"the VM is {observed} as planned, and its spec says running",
            )
        return Action.NO_OP, ActionReason.NO_OP_AS_PLANNED, f"the VM is {observed} as planned"
    # creating: a create in flight or one that died half way; error: cocoon could not run it.
    return (
        Action.UNKNOWN,
        ActionReason.UNKNOWN_BECAUSE_VM_STATE,
        f"cocoon records the VM as {observed!r}: inspect it with `cocoon vm inspect` before planning it",
    )


_RESOURCES = frozenset({"cpu", "memory", "storage", "nics", "network"})


def replace_reason(paths: Sequence[str], drift: Sequence[Drift]) -> ActionReason:
    """The cause of a replace, most telling first: layers the VM should not run on, then a new
    source, then resources, then anything else of its configuration."""
    if any(d.kind is DriftKind.LAYER for d in drift):
        return ActionReason.REPLACE_BECAUSE_LAYERS_DRIFTED
    if "source" in paths:
        return ActionReason.REPLACE_BECAUSE_SOURCE_CHANGED
    if _RESOURCES & set(paths):
        return ActionReason.REPLACE_BECAUSE_RESOURCES_CHANGED
    return ActionReason.REPLACE_BECAUSE_CONFIG_CHANGED


def _said(change: Change) -> str:
    """``cpu 2 → 4`` for a setting, else the field's name."""
    name = str(change.path[0])
    if len(change.path) == 1 and isinstance(change.after, int | str) and isinstance(change.before, int | str):
        return f"{name} {change.before} → {change.after}"
    return name


def replace_sentence(why: ActionReason, changes: Sequence[Change]) -> str:
    """The replace's cause in words; cocoon has no way to change a VM in place."""
    standing = [c for c in changes if c.cause is None]
    if why is ActionReason.REPLACE_BECAUSE_LAYERS_DRIFTED:
        cause = "it runs on layers that are not its source's (see its drift)"
    elif why is ActionReason.REPLACE_BECAUSE_SOURCE_CHANGED:
        cause = "its source is another digest now"
    else:
        named = list(dict.fromkeys(_said(c) for c in standing))
        cause = f"{', '.join(named[:4])}{', …' if len(named) > 4 else ''} {'differ' if len(named) > 1 else 'differs'}"
    return f"{cause}, and cocoon cannot change a VM in place"


def destroyed(vm: ObservedVM) -> tuple[str, ...]:
    """What removing ``vm`` throws away: its guest's memory, its cow and its data disks."""
    lost = ["the running guest's memory"] if vm.running else []
    for disk in vm.storage_configs:
        if disk.role is DiskRole.COW:
            lost.append(f"cow disk {disk.path}")
        elif disk.role is DiskRole.DATA:
            lost.append(f"data disk {disk.serial} {disk.path}")
    return tuple(lost)


def _started(desired: DesiredVM, running: ObservedVM, view: NodeView) -> DesiredVM:
    """A VM that ``cocoon vm start`` will start: a clone cold-boots from its record then."""
    if desired.mode is not Mode.CLONE:
        return desired
    note = (
        "cocoon vm start cold-boots a clone from its record: the guest boots the recorded cmdline "
        "(its own hostname and address), not the snapshot's memory"
    )
    return desired.model_copy(
        update={
            "launch": record_launch(running, view.settings, rules_for(view)) or desired.launch,
            "restore": (),
            "notes": (note,),
        }
    )


def _network_unknown(desired: DesiredVM, running: ObservedVM) -> DesiredVM:
    """``desired`` with a warning when its network cannot be compared with ``running``'s record.

    A spec that omits ``network`` means the node's default; when that is not known (no
    ``defaultNetwork``, no readable CNI conf dir) the planned network is empty and the record's
    is not compared, so a record naming any network is no change. Unknown is never a reason to
    change, but it is said.
    """
    if desired.network or not (desired.nics or running.settings.network):
        return desired  # compared, or a VM without NICs and without a network to compare
    recorded = f" (its record names {running.settings.network!r})" if running.settings.network else ""
    warning = (
        f"the network of VM {desired.name} on node {desired.node} is not compared{recorded}: the node's "
        f"default network is not known; set defaultNetwork or cniConfDir for node {desired.node} "
        "in cocoonplan.yaml"
    )
    return desired.model_copy(update={"warnings": (*desired.warnings, warning)})


def plan_vm(item: PlanInput, view: NodeView, memo: Memo | None = None) -> VMPlan:
    """Compare a desired VM with the node: create, replace, start, stop, no-op or unknown.

    A VM that stays keeps its identity (ID, NICs, paths) so that only real differences show;
    a VM created or replaced gets a fresh, provisional one, as cocoon will draw a new one.
    """
    if view.state is None:
        desired = fresh_vm(item, view, memo)
        return _decided(
            desired,
            action=Action.UNKNOWN,
            action_reason=ActionReason.UNKNOWN_BECAUSE_NODE_STATE_UNKNOWN,
            reason=f"the state of node {view.name} is not known, so whether this VM exists is not known",
            fetch_bytes=_fetch_bytes(desired),
        )
    running = view.state.vm_named(item.loaded.spec.name)
    if running is None:
        desired = fresh_vm(item, view, memo)
        return _decided(
            desired,
            action=Action.CREATE,
            action_reason=ActionReason.CREATE_BECAUSE_ABSENT,
            reason="no VM of this name is on the node",
            fetch_bytes=_fetch_bytes(desired),
        )
    kept = _network_unknown(compile_vm(item, kept_identity(running, nic_count(item)), view, memo), running)
    node_launch = record_launch(running, view.settings, rules_for(view))
    changes = diff_vm(kept, running, node_launch)
    drift = drift_of(running, view)
    observed = {
        "observed_id": running.id,
        "observed_state": running.state,
        "observed_fingerprint": running.fingerprint(),
        "drift": drift + file_drift_of(file_drift(item.loaded, item.resolved, running)),
    }
    if changes:
        paths = replace_paths(changes)
        desired = _network_unknown(fresh_vm(item, view, memo), running)
        # Which fields differ is decided with the identity held (a new ID is no difference of
        # its own); what they become is what the replacement will have.
        planned = {change.path: change for change in diff_vm(desired, running, node_launch)}
        return _decided(
            desired,
            action=Action.REPLACE,
            action_reason=(why := replace_reason(paths, drift)),
            reason=replace_sentence(why, changes),
            destroys=destroyed(running),
            replace_paths=paths,
            changes=tuple(
                planned[change.path].model_copy(update={"cause": change.cause})
                if change.path in planned
                else change
                for change in changes
            ),
            fetch_bytes=_fetch_bytes(desired),
            observed=running,
            **observed,
        )
    action, why, reason = power_action(running.state, kept.state)
    if action is Action.START:
        kept = _started(kept, running, view)
    # Only a VM apply acts on carries its record: apply names what changed in it since.
    record = running if action in (Action.START, Action.STOP) else None
    return _decided(
        kept, action=action, action_reason=why, reason=reason, fetch_bytes=0, observed=record, **observed
    )


def _observed_source(vm: ObservedVM) -> tuple[PinnedRef | None, PinnedRef | None]:
    """(source, base image) of a VM as its records name them.

    A clone's record names only its base image; the snapshot is known from cocoonplan's own
    ownership record, when there is one.
    """
    settings = vm.settings
    base = (
        PinnedRef(ref=settings.image, digest=settings.image_digest)
        if settings.image and settings.image_digest
        else None
    )
    if vm.mode is Mode.RUN:
        digest = vm.owner.source if vm.owner else settings.image_digest
        return (PinnedRef(ref=settings.image or vm.name, digest=digest) if digest else None), None
    if vm.owner is None:
        return None, base
    label = vm.owner.source_ref or f"(snapshot baked from {settings.image or 'an unknown image'})"
    return PinnedRef(ref=label, digest=vm.owner.source), base


def observed_plan(vm: ObservedVM, view: NodeView, action: Action, reason: str) -> VMPlan:
    """A plan entry for a VM as the node has it: a delete, or a refresh-only report."""
    source, base = _observed_source(vm)
    return VMPlan(
        name=vm.name,
        node=view.name,
        mode=vm.mode,
        spec_file=vm.owner.spec_file if vm.owner else None,
        vm_id=vm.id,
        state=PowerState.RUNNING if vm.running else PowerState.STOPPED,
        source=source,
        base_image=base,
        cpu=vm.settings.cpu,
        memory=vm.settings.memory,
        storage=vm.settings.storage,
        nics=len(vm.nics),
        network=vm.settings.network,
        interfaces=tuple(
            PlannedNic(
                index=i,
                tap=n.tap,
                mac=n.mac,
                num_queues=n.num_queues,
                queue_size=n.queue_size,
                address=n.network,
            )
            for i, n in enumerate(vm.nics)
        ),
        blobs=(),
        disks=tuple(observed_disk(i, c) for i, c in enumerate(vm.storage_configs)),
        config=vm.runtime_config or {},
        config_origin=ConfigOrigin.DERIVED if vm.runtime_config is None else ConfigOrigin.WRITTEN,
        cmdline=vm.boot_config.cmdline or "" if vm.boot_config else "",
        launch=record_launch(vm, view.settings, rules_for(view)) or (),
        action=action,
        action_reason=ActionReason.DELETE_BECAUSE_SPEC_REMOVED
        if action is Action.DELETE
        else ActionReason.REFRESH_ONLY,
        destroys=destroyed(vm) if action is Action.DELETE else (),
        reason=reason,
        drift=drift_of(vm, view),
        observed_id=vm.id,
        observed_state=vm.state,
        observed_fingerprint=vm.fingerprint(),
        observed=vm if action is Action.DELETE else None,
        fetch_bytes=0,
    )


def _in_scope(spec_file: str | None, scope: Sequence[str]) -> bool:
    if spec_file is None:
        return False
    return any(p == "." or spec_file == p or spec_file.startswith(p.rstrip("/") + "/") for p in scope)


def unclaimed(
    view: NodeView, defined: set[str], scope: Sequence[str]
) -> tuple[list[VMPlan], list[Diagnostic]]:
    """VMs on the node no spec defines: deletes for those cocoonplan created from a planned file,
    a warning for each VM it did not create (never touched)."""
    deletes: list[VMPlan] = []
    warnings: list[Diagnostic] = []
    for vm in view.state.vms if view.state else ():
        if vm.name in defined:
            continue
        if vm.owner is None:
            warnings.append(
                Diagnostic(
                    summary=f"VM {vm.name} ({vm.id}) on node {view.name} was not created by cocoonplan; left alone",
                    vm=vm.name,
                )
            )
        elif vm.owner.spec_file is None:
            warnings.append(
                Diagnostic(
                    summary=f"VM {vm.name} ({vm.id}) on node {view.name} was created by cocoonplan from no "
                    "recorded spec file and no spec defines it; left alone",
                    vm=vm.name,
                )
            )
        elif _in_scope(vm.owner.spec_file, scope):
            reason = f"cocoonplan created it from {vm.owner.spec_file}, which no longer defines it"
            deletes.append(observed_plan(vm, view, Action.DELETE, reason))
    return deletes, warnings


def _foreign(item: PlanInput, view: NodeView, adopting: Collection[tuple[str, str]] = ()) -> PlanError | None:
    """Why a spec over a VM cocoonplan did not create cannot be planned; None when it can.

    A VM being adopted (``cocoonplan import``) is planned as if owned, provided the spec
    makes it the way it was made: a clone spec over a run VM (or the reverse) is refused.
    """
    running = view.state.vm_named(item.loaded.spec.name) if view.state else None
    if running is None or running.owner is not None:
        return None
    if (view.name, running.name) in adopting:
        wanted = Mode.CLONE if item.resolved.snapshot is not None else Mode.RUN
        if running.mode is wanted:
            return None
        return PlanError(
            f"VM {running.name} ({running.id}) on node {view.name} is a {running.mode.value}, "
            f"and the spec plans a {wanted.value}",
            hint="import it with a spec of the same mode (`image:` for a run, `snapshot:` for a clone)",
        )
    return PlanError(
        f"VM {running.name} ({running.id}) already runs on node {view.name} and was not created by cocoonplan",
        hint=f"cocoonplan replaces or deletes only VMs it created: take it over with `cocoonplan import "
        f"{view.name}/{running.name} SPEC`, remove it with `cocoon vm rm`, or rename the spec",
    )


def summarize(vms: Sequence[VMPlan], errors: Sequence[Diagnostic]) -> Summary:
    """Counts of actions and drift, and the blobs and bytes to fetch (each blob once per node)."""
    counts = {action: 0 for action in Action}
    fetch: dict[tuple[str, str], int] = {}
    for vm in vms:
        counts[vm.action] += 1
        if vm.action in (Action.CREATE, Action.REPLACE):
            for blob in vm.blobs:
                if not blob.present:
                    fetch[(vm.node, blob.digest)] = blob.size
    return Summary(
        create=counts[Action.CREATE],
        update=counts[Action.UPDATE],
        replace=counts[Action.REPLACE],
        delete=counts[Action.DELETE],
        start=counts[Action.START],
        stop=counts[Action.STOP],
        unknown=counts[Action.UNKNOWN],
        no_op=counts[Action.NO_OP],
        fetch_bytes=sum(fetch.values()),
        fetch_blobs=len(fetch),
        errors=len(errors),
        drifted=sum(1 for vm in vms if vm.drift),
    )


def refresh(nodes: Mapping[str, NodeView]) -> list[VMPlan]:
    """Every VM on every node with its drift, proposing nothing (``plan --refresh-only``)."""
    reason = "refresh only: drift is reported, nothing is changed"
    return [
        observed_plan(vm, view, Action.NO_OP, reason)
        for view in nodes.values()
        for vm in (view.state.vms if view.state else ())
    ]


def recovered_metadata(nodes: Mapping[str, NodeView]) -> list[Diagnostic]:
    """One warning per metadata file of a node read from its ``.prev`` generation: cocoon reads
    it the same way, so the plan stands, but the node's newest commit to it may be lost."""
    return [
        Diagnostic(
            summary=f"node {name}: {line}; its last change may be lost",
            hint="check the node's records with `cocoon vm list`; if the root was copied while cocoon "
            "wrote it, copy it again",
        )
        for name, view in sorted(nodes.items())
        for line in (view.state.recovered if view.state else ())
    ]


def vm_warnings(vms: Sequence[VMPlan]) -> list[Diagnostic]:
    """The warnings of each VM's plan, attributed to it, in node and name order: the plan and
    its digest do not depend on the order the specs were given in."""
    ordered = sorted(vms, key=lambda vm: (vm.node, vm.name))
    return [Diagnostic(summary=w, vm=vm.name, file=vm.spec_file) for vm in ordered for w in vm.warnings]


def unknown_nodes(vms: Sequence[VMPlan], nodes: Mapping[str, NodeView]) -> list[Diagnostic]:
    """One warning per node whose state is not known but which specs target."""
    targeted = sorted({vm.node for vm in vms if nodes[vm.node].state is None})
    return [
        Diagnostic(
            summary=f"the state of node {name} is not known: its VMs are planned as unknown and nothing "
            "on it will be created, replaced or deleted",
            hint=f"set `state:` for {name} in cocoonplan.yaml, pass --root/--state, or pass "
            f"--assume-empty-node {name} for a node known to have no VMs",
        )
        for name in targeted
    ]


def make_plan(
    inputs: Sequence[PlanInput],
    *,
    nodes: Mapping[str, NodeView],
    tool_version: str,
    claimed: Collection[tuple[str, str]] = (),
    scope: Sequence[str] = (".",),
    refresh_only: bool = False,
    lock_changes: Sequence[LockChange] = (),
    errors: Sequence[Diagnostic] = (),
    warnings: Sequence[Diagnostic] = (),
    adopting: Collection[tuple[str, str]] = (),
) -> Plan:
    """Plan every VM against its node; a VM that cannot be planned becomes an error entry.

    ``claimed`` are the (node, VM name) pairs of every spec that was read, including those
    that failed to resolve: their VMs are never deleted. ``scope`` are the planned paths
    (relative to the project): a VM cocoonplan created from a spec file inside them that no
    spec defines any more is deleted. A refresh-only plan lists every VM on the nodes with
    its drift and proposes nothing. ``adopting`` are (node, VM name) pairs of VMs cocoonplan
    did not create to plan as if it had (``cocoonplan import``), when their spec's mode fits.
    """
    vms: list[VMPlan] = []
    memo = Memo()
    diagnostics = list(errors)
    # Node-wide contradictions fail the whole plan before any VM is planned on them.
    builds = {name: hypervisor_build(view) for name, view in nodes.items()}
    notes = list(warnings) + recovered_metadata(nodes)
    defined: dict[str, set[str]] = {name: set() for name in nodes}
    for node, name in claimed:
        # A spec elsewhere in the project may name a node the project does not declare (it
        # fails when planned itself): only declared nodes' VMs are ever deleted, so such a
        # claim has nothing to protect.
        if node in defined:
            defined[node].add(name)
    for item in [] if refresh_only else inputs:
        spec = item.loaded.spec
        view = nodes[spec.spec.node]
        defined[view.name].add(spec.name)
        try:
            foreign = _foreign(item, view, adopting)
            if foreign is not None:
                raise foreign
            vms.append(plan_vm(item, view, memo))
        except CocoonplanError as exc:
            diagnostics.append(Diagnostic.from_error(exc, vm=spec.name, file=item.loaded.file))
    if refresh_only:
        vms = refresh(nodes)
    else:
        notes += vm_warnings(vms)
        notes += unknown_nodes(vms, nodes)
        for view in nodes.values():
            deletes, foreign_warnings = unclaimed(view, defined[view.name], scope)
            vms += deletes
            notes += foreign_warnings
    vms.sort(key=lambda vm: (vm.node, vm.name))
    complete = not diagnostics and all(vm.action is not Action.UNKNOWN for vm in vms)
    plan = Plan(
        tool_version=tool_version,
        refresh_only=refresh_only,
        complete=complete,
        applyable=complete and not refresh_only,
        nodes=tuple(
            PlannedNode(
                name=view.name,
                cocoon=view.cocoon,
                cloud_hypervisor=builds[view.name],
                state_known=view.state is not None,
            )
            for view in sorted(nodes.values(), key=lambda view: view.name)
        ),
        vms=tuple(vms),
        drift=tuple(NodeDrift(**d.model_dump(), vm=vm.name, node=vm.node) for vm in vms for d in vm.drift),
        lock_changes=tuple(sorted(lock_changes, key=lambda c: c.ref)),
        errors=tuple(diagnostics),
        warnings=tuple(notes),
        summary=summarize(vms, diagnostics),
    )
    return plan.model_copy(update={"digest": plan.content_digest()})
