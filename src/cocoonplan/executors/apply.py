"""Carry out compiled steps on the nodes: content by digest first, then VMs through cocoon.

The executors here decide nothing: every step says what to do, and each result is checked
against the plan (blobs by digest, records by what cocoon printed). The caller holds each
node's lease and checks, before and after, that the node is what the plan says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cocoonplan.atomic import read_bounded, write_atomic
from cocoonplan.bounded import InputLimitError, loads_written_by_go
from cocoonplan.cocoon import DiskRole, MetadataEngine, SnapshotConfig, SnapshotMeta, snapshot_import_name
from cocoonplan.errors import ApplyError
from cocoonplan.executors.blobs import BlobProgress, BlobSources, blob_path, fetch_blobs
from cocoonplan.executors.cocoon import CocoonCLI, clone_arguments, run_arguments
from cocoonplan.executors.layers import LayerBlob, convert_layers, record_image
from cocoonplan.executors.snapshots import write_import_tar
from cocoonplan.model import Mode
from cocoonplan.nodefs import Cap, Tree
from cocoonplan.observed import OWNERSHIP_FILE, NodeState, Owner
from cocoonplan.planner.model import (
    Action,
    BlobKind,
    Change,
    ChangeKind,
    ChangeOp,
    Plan,
    PlannedBlob,
    VMPlan,
    dotted,
)
from cocoonplan.planner.rules import Rules
from cocoonplan.planner.steps import Step, StepKind

STAGING = "cocoonplan/staging"
"""Under the node root: where blobs are fetched to before they are converted or imported."""
OWNERSHIP_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class NodeTarget:
    """One node as apply acts on it."""

    name: str
    local: Path
    """The node's cocoon root directory, as reachable from here."""
    rules: Rules
    engine: MetadataEngine | None
    cocoon: CocoonCLI | None
    """None for ``--content-only``: no VM step may run."""


@dataclass
class Outcome:
    """What apply did on one node, for the ownership record and the report."""

    created: dict[str, str] = field(default_factory=dict)
    """VM name -> the ID cocoon chose."""
    removed: set[str] = field(default_factory=set)
    """IDs of the VMs removed."""
    done: list[Step] = field(default_factory=list)


def _blobs(plan: Plan, node: str) -> dict[str, PlannedBlob]:
    return {blob.digest: blob for vm in plan.vms if vm.node == node for blob in vm.blobs}


def _vm(plan: Plan, step: Step) -> VMPlan:
    return next(vm for vm in plan.vms if vm.node == step.node and vm.name == step.vm)


def _cli(target: NodeTarget, step: Step) -> CocoonCLI:
    if target.cocoon is None:
        raise ApplyError(f"step {step.kind} on {step.node} needs cocoon, and apply runs content only")
    return target.cocoon


def fetch_content(
    plan: Plan, steps: Sequence[Step], target: NodeTarget, sources: BlobSources, progress: BlobProgress
) -> Path:
    """Fetch every blob the node's steps name into its staging directory; returns it."""
    staging = target.local / STAGING
    wanted = _blobs(plan, target.name)
    requests = [wanted[s.digest] for s in steps if s.kind is StepKind.FETCH_BLOB and s.digest]
    if requests:
        fetch_blobs(requests, sources, staging, progress=progress)
    return staging


def convert_content(plan: Plan, steps: Sequence[Step], target: NodeTarget, staging: Path) -> None:
    """Convert the node's layers, as ``cocoon image pull`` leaves them (parallel up to the cores)."""
    layers = [
        LayerBlob(digest=s.digest, path=blob_path(staging, s.digest))
        for s in steps
        if s.kind is StepKind.CONVERT_LAYER and s.digest
    ]
    if layers:
        convert_layers(layers, target.local)


def record_images(
    plan: Plan, steps: Sequence[Step], target: NodeTarget, clock: Callable[[], datetime]
) -> None:
    """The images.json entries fresh runs need: written under cocoon's lock on a JSON-engine
    node; on a SQLite node (whose store cocoonplan never writes) by ``cocoon image pull``."""
    for step in steps:
        if step.kind is not StepKind.RECORD_IMAGE:
            continue
        record = next(
            vm.image_record
            for vm in plan.vms
            if vm.node == step.node and vm.image_record and vm.image_record.manifest_digest == step.digest
        )
        if target.engine is MetadataEngine.SQLITE:
            _cli(target, step).run(["image", "pull", record.key])
            continue
        record_image(
            target.local,
            record.key,
            record.manifest_digest,
            record.layers,
            record.kernel_layer,
            record.initrd_layer,
            clock=clock,
        )


def _snapshot_config(path: Path, digest: str) -> SnapshotConfig:
    try:
        return SnapshotConfig.model_validate(loads_written_by_go(path.read_bytes()))
    except (OSError, InputLimitError, ValueError) as exc:
        raise ApplyError(f"snapshot config blob {digest} cannot be read back: {exc}") from exc


def import_snapshot(plan: Plan, step: Step, target: NodeTarget, staging: Path, state: NodeState) -> None:
    """``cocoon snapshot import`` of the verified artifact under its digest-derived name; a
    snapshot of that name already on the node is the same content (the name is its digest),
    unless cocoon left it ``pending`` (an import killed midway): that one is removed and
    imported again (the caller holds the node's lease: no other apply is writing it)."""
    vm = _vm(plan, step)
    local = next((snapshot for snapshot in state.snapshots if snapshot.name == step.detail), None)
    if local is not None:
        if not _pending(_cli(target, step), step.detail):
            _check_reused(vm, local.id, target.local)
            return
        _cli(target, step).run(["snapshot", "rm", step.detail])
    config = next(b for b in vm.blobs if b.kind is BlobKind.SNAPSHOT_CONFIG)
    files = {
        b.title: blob_path(staging, b.digest)
        for b in vm.blobs
        if b.kind is BlobKind.SNAPSHOT_FILE and b.title
    }
    snapshot = _snapshot_config(blob_path(staging, config.digest), config.digest)
    _cli(target, step).run(
        ["snapshot", "import", "--name", step.detail],
        feed=lambda out: write_import_tar(out, snapshot, step.detail, files),
    )


def _check_reused(vm: VMPlan, snapshot_id: str, local: Path) -> None:
    """A snapshot already on the node is reused only when its ``cocoon.json`` names exactly the
    layers the plan clones: a name can be taken by hand, content cannot."""
    rel = f"snapshot/localfile/{snapshot_id}/cocoon.json"
    with Tree.open(local, "cocoon root dir", "copy the node's root again") as tree:
        data = tree.read(rel, Cap.RUN_FILE)
    try:
        meta = SnapshotMeta.model_validate(loads_written_by_go(data or b"null"))
    except (InputLimitError, ValueError) as exc:
        raise ApplyError(f"{rel}: not a snapshot sidecar cocoon could clone: {exc}") from exc
    found = [c.path for c in meta.storage_configs if c.role is DiskRole.LAYER]
    planned = [d.path for d in vm.disks if d.role is DiskRole.LAYER]
    if found != planned:
        raise ApplyError(
            f"node {vm.node} holds snapshot {snapshot_id} under the planned name, whose layers are not the "
            f"plan's ({len(found)} layers, {len(planned)} planned)",
            hint="remove it with `cocoon snapshot rm`, then apply again: cocoonplan imports it afresh",
        )


def _pending(cli: CocoonCLI, name: str) -> bool:
    """Whether cocoon's record of the snapshot ``name`` says it is still being written."""
    try:
        record = json.loads(cli.run(["snapshot", "inspect", name]))
    except ValueError as exc:
        raise ApplyError(f"`cocoon snapshot inspect {name}` printed no JSON record") from exc
    return isinstance(record, dict) and record.get("pending") is True


def change_vm(plan: Plan, step: Step, target: NodeTarget, outcome: Outcome) -> None:
    """One ``cocoon vm`` command of a VM step; a created VM's ID is what cocoon printed."""
    cli = _cli(target, step)
    vm = _vm(plan, step)
    if step.kind is StepKind.REMOVE_VM:
        cli.run(["vm", "rm", "--force", step.detail])
        outcome.removed.add(step.detail)
    elif step.kind is StepKind.CREATE_VM:
        args = (
            run_arguments(vm)
            if vm.mode is Mode.RUN
            else clone_arguments(vm, _import_name(plan, step), target.rules)
        )
        outcome.created[vm.name] = str(cli.record(args)["id"])
    elif step.kind is StepKind.START_VM:
        cli.run(["vm", "start", vm.name])
    elif step.kind is StepKind.STOP_VM:
        cli.run(["vm", "stop", vm.name])


def _import_name(plan: Plan, step: Step) -> str:
    vm = _vm(plan, step)
    assert vm.source is not None
    return snapshot_import_name(vm.source.digest)


def _owners(local: Path) -> dict[str, Any]:
    data = read_bounded(local, OWNERSHIP_FILE, OWNERSHIP_LIMIT)
    if data is None:
        return {"format_version": 1, "vms": {}}
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ApplyError(f"{local / OWNERSHIP_FILE} cannot be read back: {exc}") from exc
    return document if isinstance(document, dict) else {"format_version": 1, "vms": {}}


def record_ownership(
    plan: Plan, node: str, local: Path, outcome: Outcome, state: NodeState, *, applied: bool = True
) -> None:
    """Record the VMs apply created (and forget those it removed) in ``cocoonplan/owned.json``,
    with what it applied and, when ``applied``, the plan's digest, written atomically."""
    document = _owners(local)
    last = plan.digest if applied else document.get("applied_plan")
    vms: dict[str, Any] = {k: v for k, v in (document.get("vms") or {}).items() if k not in outcome.removed}
    for name, vm_id in outcome.created.items():
        planned = next(vm for vm in plan.vms if vm.node == node and vm.name == name)
        observed = next((vm for vm in state.vms if vm.id == vm_id), None)
        assert planned.source is not None
        owner = Owner(
            name=name,
            spec_file=planned.spec_file,
            source=planned.source.digest,
            source_ref=planned.source.ref,
            mode=planned.mode,
            config_sha256=observed.runtime_config_sha256 if observed else None,
            cmdline=observed.boot_config.cmdline if observed and observed.boot_config else None,
        )
        vms[vm_id] = owner.model_dump(mode="json", exclude_none=True)
    document = {"format_version": 1, "vms": dict(sorted(vms.items()))}
    if last is not None:
        document["applied_plan"] = last
    write_atomic(local, OWNERSHIP_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")


def record_adoption(plan: Plan, node: str, name: str, local: Path, state: NodeState) -> str:
    """Take the VM ``name`` of ``state`` (read under the node's lease) into ``owned.json`` as
    ``plan`` planned it (``cocoonplan import``), keeping every other entry and the digest of
    the last applied plan; returns its ID. Refuses a VM that is gone or already owned."""
    observed = state.vm_named(name)
    if observed is None:
        raise ApplyError(
            f"no VM named {name} is on node {node} any more", hint="list the node's VMs with `cocoon vm list`"
        )
    if observed.owner is not None:
        raise ApplyError(f"VM {name} ({observed.id}) on node {node} is already cocoonplan's")
    record_ownership(plan, node, local, Outcome(created={name: observed.id}), state, applied=False)
    return observed.id


@dataclass(frozen=True)
class World:
    """What apply may touch, passed in: the nodes, where blobs come from, the clock, and how
    to read a node back and plan it again."""

    targets: Mapping[str, NodeTarget]
    sources: BlobSources
    progress: BlobProgress
    clock: Callable[[], datetime]
    read_state: Callable[[str], NodeState]
    replan: Callable[[str], Plan]


def check_fresh(plan: Plan, node: str, state: NodeState, targets: Sequence[str]) -> None:
    """Refuse a plan made against another state of ``node``: every VM it changes must be on the
    node exactly as observed then (its fingerprint), and every VM it creates still absent."""
    stale = []
    for vm in plan.vms:
        if vm.node != node or vm.action is Action.NO_OP or (targets and vm.name not in targets):
            continue
        current = state.vm_named(vm.name)
        if vm.observed_fingerprint is None and current is not None:
            stale.append(f"{vm.name}: a VM of this name appeared ({current.id})")
        elif vm.observed_fingerprint is not None and current is None:
            stale.append(f"{vm.name}: the VM is gone from the node")
        elif current is not None and vm.observed_fingerprint not in (None, current.fingerprint()):
            stale.append(f"{vm.name}: the VM changed on the node (state {current.state})")
    if stale:
        raise ApplyError(
            f"the plan is stale for node {node}: " + "; ".join(stale),
            hint="plan again and review the new plan; apply carries out only what was reviewed",
        )


def _file_of(value: Any) -> Any:
    """A disk's path, or a config value as it is."""
    return value.get("path", value) if isinstance(value, dict) else value


def _difference(change: Change) -> str:
    where = dotted(change.path)
    # A disk's file is what cocoon substituted in #46: say which file runs and which was planned.
    before, after = _file_of(change.before), _file_of(change.after)
    if change.op is ChangeOp.ADD:
        return f"{where} is missing (planned {after})"
    if change.op is ChangeOp.REMOVE:
        return f"{where} is there ({before}) and not planned"
    if before != after and (change.kind is ChangeKind.DISK or change.path[-1] == "path"):
        return f"{where} is {before}, planned {after}"
    return where


def prove(plan: Plan, node: str, replanned: Plan) -> None:
    """The post-apply proof: planning again against the node must propose nothing and find no
    drift for every VM the plan touched; otherwise every differing field is named."""
    touched = {vm.name for vm in plan.vms if vm.node == node and vm.action is not Action.NO_OP}
    problems = []
    for vm in replanned.vms:
        if vm.node != node or vm.name not in touched:
            continue
        if vm.action is not Action.NO_OP or vm.drift:
            fields = [_difference(c) for c in vm.changes] + [
                f"drift {dotted(d.path)}: {d.message}" for d in vm.drift
            ]
            problems.append(f"{vm.name} ({vm.action}): {', '.join(fields) or vm.reason}")
    problems += [f"{e.vm}: {e.summary}" for e in replanned.errors if e.vm in touched]
    if problems:
        raise ApplyError(
            f"node {node} does not run what the plan says after apply: " + "; ".join(problems),
            hint="cocoon did not do what it was asked: inspect the VMs named, then plan again",
        )


def apply_node(plan: Plan, steps: Sequence[Step], node: str, world: World) -> Outcome:
    """Carry out ``steps`` (all on ``node``, in order) and prove the result; the caller holds
    the node's lease and has checked the plan is fresh."""
    target = world.targets[node]
    outcome = Outcome()
    staging = fetch_content(plan, steps, target, world.sources, world.progress)
    convert_content(plan, steps, target, staging)
    record_images(plan, steps, target, world.clock)
    for step in steps:
        if step.kind is StepKind.IMPORT_SNAPSHOT:
            import_snapshot(plan, step, target, staging, world.read_state(node))
        elif step.kind in (StepKind.REMOVE_VM, StepKind.CREATE_VM, StepKind.START_VM, StepKind.STOP_VM):
            change_vm(plan, step, target, outcome)
    kinds = {step.kind for step in steps}
    if StepKind.RECORD_OWNERSHIP in kinds:
        record_ownership(plan, node, target.local, outcome, world.read_state(node))
    if StepKind.PROVE in kinds:
        prove(plan, node, world.replan(node))
    outcome.done = list(steps)
    return outcome
