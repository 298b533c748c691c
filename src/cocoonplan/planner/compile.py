"""``make_plan``: resolved inputs in, a frozen plan out. Pure: no I/O, no clock, no globals."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from cocoonplan.errors import CocoonplanError, PlanError
from cocoonplan.model import Model
from cocoonplan.observed import ObservedVM
from cocoonplan.planner.clone import clone_nic_count, plan_clone
from cocoonplan.planner.diff import diff_vm, observed_disk, replace_paths
from cocoonplan.planner.drift import drift_of
from cocoonplan.planner.identity import identity_for
from cocoonplan.planner.model import (
    Action,
    DesiredVM,
    Diagnostic,
    LockChange,
    Mode,
    Plan,
    Summary,
    VMPlan,
)
from cocoonplan.planner.run import plan_run, run_nic_count
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import NodeView, PinnedRef, ResolvedVM
from cocoonplan.spec import LoadedSpec


class PlanInput(Model):
    """One VM's spec with everything it resolved to and the node it targets."""

    loaded: LoadedSpec
    resolved: ResolvedVM
    node: NodeConfig


def compile_vm(item: PlanInput, running: ObservedVM | None) -> DesiredVM:
    """The desired VM of one spec, keeping a running VM's ID and NICs; raises PlanError."""
    spec = item.loaded.spec
    resolved = item.resolved
    if resolved.snapshot is not None:
        nics = clone_nic_count(item.loaded, resolved.snapshot)
        identity = identity_for(spec.spec.node, spec.name, nics, running)
        return plan_clone(
            item.loaded,
            resolved.snapshot,
            resolved.expected_base,
            item.node,
            identity,
            resolved.present_blobs,
        )
    assert resolved.image is not None  # a spec names exactly one of snapshot or image
    identity = identity_for(spec.spec.node, spec.name, run_nic_count(item.loaded), running)
    return plan_run(item.loaded, resolved.image, item.node, identity, resolved.present_blobs)


def _fetch_bytes(desired: DesiredVM) -> int:
    return sum(b.size for b in desired.blobs if not b.present)


def decide(desired: DesiredVM, view: NodeView) -> VMPlan:
    """Compare a desired VM with the node: create, replace or no-op, with changes and drift."""
    running = view.state.vm_named(desired.name) if view.state else None
    base = desired.model_dump()
    if running is None:
        return VMPlan(
            **base,
            action=Action.CREATE,
            reason="no VM of this name runs on the node",
            fetch_bytes=_fetch_bytes(desired),
        )
    images = view.state.images if view.state else ()
    drift = drift_of(running, view.bases.get(running.id), images)
    changes = diff_vm(desired, running)
    paths = replace_paths(changes)
    if not changes:
        return VMPlan(
            **base,
            action=Action.NO_OP,
            reason="the node runs this VM as planned",
            drift=drift,
            observed_fingerprint=running.fingerprint(),
            fetch_bytes=0,
        )
    return VMPlan(
        **base,
        action=Action.REPLACE,
        reason=f"{', '.join(paths)} {'differs' if len(paths) == 1 else 'differ'} on the node, and cocoon cannot change a VM in place",
        replace_paths=paths,
        changes=changes,
        drift=drift,
        observed_fingerprint=running.fingerprint(),
        fetch_bytes=_fetch_bytes(desired),
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
    if vm.runtime_meta is None:
        digest = vm.owner.source if vm.owner else settings.image_digest
        return (PinnedRef(ref=settings.image or vm.name, digest=digest) if digest else None), None
    if vm.owner is None:
        return None, base
    label = vm.owner.source_ref or f"(snapshot baked from {settings.image or 'an unknown image'})"
    return PinnedRef(ref=label, digest=vm.owner.source), base


def observed_plan(vm: ObservedVM, view: NodeView, action: Action, reason: str) -> VMPlan:
    """A plan entry for a VM as the node has it: a delete, or a refresh-only report."""
    images = view.state.images if view.state else ()
    source, base = _observed_source(vm)
    return VMPlan(
        name=vm.name,
        node=view.name,
        mode=Mode.CLONE if vm.runtime_meta is not None else Mode.RUN,
        spec_file=vm.owner.spec_file if vm.owner else None,
        vm_id=vm.id,
        source=source,
        base_image=base,
        cpu=vm.settings.cpu,
        memory=vm.settings.memory,
        storage=vm.settings.storage,
        nics=len(vm.nics),
        network=vm.settings.network,
        blobs=(),
        disks=tuple(observed_disk(i, c) for i, c in enumerate(vm.storage_configs)),
        config=vm.runtime_config or {},
        cmdline=vm.boot_config.cmdline or "" if vm.boot_config else "",
        launch=vm.launch or "",
        action=action,
        reason=reason,
        drift=drift_of(vm, view.bases.get(vm.id), images),
        observed_fingerprint=vm.fingerprint(),
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


def _foreign(item: PlanInput, view: NodeView) -> PlanError | None:
    running = view.state.vm_named(item.loaded.spec.name) if view.state else None
    if running is None or running.owner is not None:
        return None
    return PlanError(
        f"VM {running.name} ({running.id}) already runs on node {view.name} and was not created by cocoonplan",
        hint="cocoonplan replaces or deletes only VMs it created: remove that VM with `cocoon vm rm`, or rename the spec",
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
) -> Plan:
    """Plan every VM against its node; a VM that cannot be planned becomes an error entry.

    ``claimed`` are the (node, VM name) pairs of every spec that was read, including those
    that failed to resolve: their VMs are never deleted. ``scope`` are the planned paths
    (relative to the project): a VM cocoonplan created from a spec file inside them that no
    spec defines any more is deleted. A refresh-only plan lists every VM on the nodes with
    its drift and proposes nothing.
    """
    vms: list[VMPlan] = []
    diagnostics = list(errors)
    notes = list(warnings)
    defined: dict[str, set[str]] = {name: set() for name in nodes}
    for node, name in claimed:
        defined[node].add(name)
    for item in [] if refresh_only else inputs:
        spec = item.loaded.spec
        view = nodes[spec.spec.node]
        defined[view.name].add(spec.name)
        try:
            foreign = _foreign(item, view)
            if foreign is not None:
                raise foreign
            running = view.state.vm_named(spec.name) if view.state else None
            vms.append(decide(compile_vm(item, running), view))
        except CocoonplanError as exc:
            diagnostics.append(Diagnostic.from_error(exc, vm=spec.name, file=item.loaded.file))
    if refresh_only:
        vms = refresh(nodes)
    else:
        for view in nodes.values():
            deletes, foreign_warnings = unclaimed(view, defined[view.name], scope)
            vms += deletes
            notes += foreign_warnings
    vms.sort(key=lambda vm: (vm.node, vm.name))
    plan = Plan(
        tool_version=tool_version,
        refresh_only=refresh_only,
        vms=tuple(vms),
        lock_changes=tuple(sorted(lock_changes, key=lambda c: c.ref)),
        errors=tuple(diagnostics),
        warnings=tuple(notes),
        summary=summarize(vms, diagnostics),
    )
    return plan.model_copy(update={"digest": plan.content_digest()})
