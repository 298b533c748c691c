"""The steps that carry out a plan, in order: a pure function of the plan document.

Apply executes these steps and nothing else; executors decide nothing. Per node, content
comes first (every blob fetched once, layers converted, images recorded, snapshots
imported), then VM lifecycle through cocoon (removals before the creations that replace
them, so a replace never leaves two VMs of one name), then cocoonplan's ownership record,
then the proof that the node now runs the plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from cocoonplan.cocoon import snapshot_import_name
from cocoonplan.errors import PlanError
from cocoonplan.model import Digest, Mode, Model
from cocoonplan.planner.model import Action, BlobKind, Plan, VMPlan
from cocoonplan.spec import PowerState


class StepKind(StrEnum):
    """What a step does; values are the wire strings."""

    FETCH_BLOB = "fetch-blob"
    """Download one blob by digest, verified, into the node's staging area."""
    CONVERT_LAYER = "convert-layer"
    """Turn a layer blob into ``oci/blobs/<hex>.erofs`` and its boot files, as ``image pull`` does."""
    RECORD_IMAGE = "record-image"
    """Make the images.json entry a fresh run looks its image up by."""
    IMPORT_SNAPSHOT = "import-snapshot"
    """``cocoon snapshot import --name <digest-derived name>`` from the fetched snapshot files."""
    REMOVE_VM = "remove-vm"
    """``cocoon vm rm``."""
    CREATE_VM = "create-vm"
    """``cocoon vm run``/``vm create`` (run mode) or ``vm clone`` (clone mode)."""
    START_VM = "start-vm"
    STOP_VM = "stop-vm"
    RECORD_OWNERSHIP = "record-ownership"
    """Record in ``cocoonplan/owned.json`` which VMs cocoonplan made (each is also recorded the
    moment cocoon made it), settling what an interrupted apply left half recorded."""
    PROVE = "prove"
    """Read the node back, bind what cocoon chose, re-plan: it must be a no-op; only then is
    the plan's digest recorded as applied and the node's staged blobs removed."""


CONTENT_STEPS = frozenset({StepKind.FETCH_BLOB, StepKind.CONVERT_LAYER, StepKind.RECORD_IMAGE})
"""What ``apply --content-only`` runs: content by digest, no cocoon binary needed."""


class Step(Model):
    """One thing apply does, on one node."""

    kind: StepKind
    node: str
    vm: str | None = None
    """The VM the step is for; None for content shared by several."""
    digest: Digest | None = None
    """The blob, layer, image manifest or snapshot the step handles."""
    detail: str = ""
    """What it is, in words (a file title, a reference, a name). For display only."""


def _content_steps(node: str, vms: list[VMPlan]) -> list[Step]:
    steps: list[Step] = []
    fetched: set[str] = set()
    converted: set[str] = set()
    for vm in vms:
        for blob in vm.blobs:
            if blob.present or blob.digest in fetched:
                continue
            fetched.add(blob.digest)
            what = blob.title or blob.source
            steps.append(
                Step(
                    kind=StepKind.FETCH_BLOB,
                    node=node,
                    digest=blob.digest,
                    detail=f"{what}, {blob.size} bytes",
                )
            )
    for vm in vms:
        for blob in vm.blobs:
            if blob.kind is BlobKind.LAYER and not blob.present and blob.digest not in converted:
                converted.add(blob.digest)
                steps.append(
                    Step(kind=StepKind.CONVERT_LAYER, node=node, digest=blob.digest, detail=blob.source)
                )
    recorded: set[str] = set()
    for vm in vms:
        record = vm.image_record
        if record is not None and not record.present and record.manifest_digest not in recorded:
            recorded.add(record.manifest_digest)
            steps.append(
                Step(kind=StepKind.RECORD_IMAGE, node=node, digest=record.manifest_digest, detail=record.key)
            )
    return steps


def _builds(vm: VMPlan) -> bool:
    return vm.action in (Action.CREATE, Action.REPLACE)


def _vm_steps(node: str, vms: list[VMPlan]) -> list[Step]:
    steps: list[Step] = []
    imported: set[str] = set()
    for vm in vms:
        if (
            _builds(vm)
            and vm.mode is Mode.CLONE
            and vm.source is not None
            and vm.source.digest not in imported
        ):
            imported.add(vm.source.digest)
            name = snapshot_import_name(vm.source.digest)
            steps.append(
                Step(
                    kind=StepKind.IMPORT_SNAPSHOT, node=node, vm=vm.name, digest=vm.source.digest, detail=name
                )
            )
    for vm in vms:
        if vm.action in (Action.REPLACE, Action.DELETE):
            steps.append(Step(kind=StepKind.REMOVE_VM, node=node, vm=vm.name, detail=vm.observed_id or ""))
    for vm in vms:
        digest = vm.source.digest if vm.source else None
        if _builds(vm):
            steps.append(
                Step(kind=StepKind.CREATE_VM, node=node, vm=vm.name, digest=digest, detail=vm.mode.value)
            )
            # cocoon leaves a run VM as created and a clone running; the plan says which to end in.
            if vm.mode is Mode.CLONE and vm.state is PowerState.STOPPED:
                steps.append(Step(kind=StepKind.STOP_VM, node=node, vm=vm.name))
        elif vm.action is Action.START:
            steps.append(Step(kind=StepKind.START_VM, node=node, vm=vm.name))
        elif vm.action is Action.STOP:
            steps.append(Step(kind=StepKind.STOP_VM, node=node, vm=vm.name))
    return steps


def refuse_unapplyable(plan: Plan) -> None:
    """Raise PlanError unless every part of ``plan`` can be carried out as it is written."""
    if plan.errors:
        raise PlanError(
            f"the plan holds {len(plan.errors)} error(s), first: {plan.errors[0].summary}",
            hint="fix them and plan again; apply carries out complete plans only",
        )
    unknown = [f"{vm.node}/{vm.name}" for vm in plan.vms if vm.action is Action.UNKNOWN]
    if unknown:
        raise PlanError(
            f"the plan cannot say what to do with {', '.join(unknown)} (action unknown)",
            hint="give the node's state (state:, --root, --state), or --assume-empty-node for an empty one, and plan again",
        )
    if plan.refresh_only:
        raise PlanError("a refresh-only plan proposes nothing to apply", hint="plan without --refresh-only")


def compile_steps(plan: Plan, targets: Iterable[str] = ()) -> tuple[Step, ...]:
    """The ordered steps of ``plan`` (limited to the VMs named in ``targets``, when given).

    Raises PlanError for a plan that holds errors, unknown actions, or is refresh-only, and
    for a target the plan does not name.
    """
    refuse_unapplyable(plan)
    wanted = set(targets)
    missing = sorted(wanted - {vm.name for vm in plan.vms})
    if missing:
        raise PlanError(
            f"--target names {', '.join(missing)}, which the plan does not hold", hint="name VMs of the plan"
        )
    steps: list[Step] = []
    for node in sorted({vm.node for vm in plan.vms}):
        vms = [vm for vm in plan.vms if vm.node == node and (not wanted or vm.name in wanted)]
        changing = [vm for vm in vms if vm.action is not Action.NO_OP]
        if not changing:
            continue
        steps += _content_steps(node, [vm for vm in changing if _builds(vm)])
        steps += _vm_steps(node, changing)
        steps.append(Step(kind=StepKind.RECORD_OWNERSHIP, node=node))
        steps.append(Step(kind=StepKind.PROVE, node=node))
    return tuple(steps)
