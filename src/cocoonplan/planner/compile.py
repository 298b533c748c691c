"""``make_plan``: resolved inputs in, a frozen plan out. Pure: no I/O, no clock, no globals."""

from __future__ import annotations

from collections.abc import Sequence

from cocoonplan.errors import CocoonplanError
from cocoonplan.model import Model
from cocoonplan.planner.clone import plan_clone
from cocoonplan.planner.identity import planned_vm_id
from cocoonplan.planner.model import Action, Diagnostic, LockChange, Plan, Summary, VMPlan
from cocoonplan.planner.run import plan_run
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import ResolvedVM
from cocoonplan.spec import LoadedSpec


class PlanInput(Model):
    """One VM's spec with everything it resolved to and the node it targets."""

    loaded: LoadedSpec
    resolved: ResolvedVM
    node: NodeConfig


def plan_vm(item: PlanInput) -> VMPlan:
    """Plan one VM; raises PlanError (or LayerMismatchError) when it cannot be planned."""
    spec = item.loaded.spec
    vm_id = planned_vm_id(spec.spec.node, spec.name)
    resolved = item.resolved
    if resolved.snapshot is not None:
        return plan_clone(
            item.loaded, resolved.snapshot, resolved.expected_base, item.node, vm_id, resolved.present_blobs
        )
    assert resolved.image is not None  # a spec names exactly one of snapshot or image
    return plan_vm_run(item, vm_id)


def plan_vm_run(item: PlanInput, vm_id: str) -> VMPlan:
    """Plan a run-mode VM."""
    assert item.resolved.image is not None
    return plan_run(item.loaded, item.resolved.image, item.node, vm_id, item.resolved.present_blobs)


def summarize(vms: Sequence[VMPlan], errors: Sequence[Diagnostic]) -> Summary:
    """Count actions, and the blobs and bytes to fetch (each blob once per node)."""
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
    )


def make_plan(
    inputs: Sequence[PlanInput],
    *,
    tool_version: str,
    lock_changes: Sequence[LockChange] = (),
    errors: Sequence[Diagnostic] = (),
) -> Plan:
    """Plan every VM; a VM that cannot be planned becomes an error entry, the others still plan."""
    vms: list[VMPlan] = []
    diagnostics = list(errors)
    for item in inputs:
        try:
            vms.append(plan_vm(item))
        except CocoonplanError as exc:
            diagnostics.append(
                Diagnostic(
                    summary=exc.summary,
                    detail=exc.detail,
                    hint=exc.hint,
                    vm=item.loaded.spec.name,
                    file=item.loaded.file,
                )
            )
    vms.sort(key=lambda vm: (vm.node, vm.name))
    return Plan(
        tool_version=tool_version,
        vms=tuple(vms),
        lock_changes=tuple(sorted(lock_changes, key=lambda c: c.ref)),
        errors=tuple(diagnostics),
        summary=summarize(vms, diagnostics),
    )
