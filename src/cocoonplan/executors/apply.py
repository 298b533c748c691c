"""Carry out compiled steps on the nodes: content by digest first, then VMs through cocoon.

The executors here decide nothing: every step says what to do, and each result is checked
against the plan (blobs by digest, records by what cocoon printed). The caller holds each
node's lease and checks, before and after, that the node is what the plan says.

A ``kill -9`` may come at any moment, so ``owned.json`` is written around every VM command:
before cocoon is asked to remove or create a VM, the entry ``building[NAME]`` says which plan
builds it and what ownership it gets; right after cocoon printed the new VM's ID, the VM is
recorded by that ID; right after ``vm rm``, the removed VM is forgotten. A VM that appears
under a name being built is cocoonplan's (the node reader attaches that ownership), and
applying the same plan again resumes: what the interrupted apply already did is not done twice.
"""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cocoonplan.atomic import read_bounded, remove_file, write_atomic
from cocoonplan.bounded import InputLimitError, loads_written_by_go
from cocoonplan.cocoon import DiskRole, MetadataEngine, SnapshotConfig, SnapshotMeta, snapshot_import_name
from cocoonplan.errors import ApplyError, CocoonplanError
from cocoonplan.executors.blobs import BlobProgress, BlobSources, blob_path, fetch_blobs
from cocoonplan.executors.cocoon import CocoonCLI, clone_arguments, run_arguments
from cocoonplan.executors.layers import LayerBlob, convert_layers, record_image
from cocoonplan.executors.snapshots import write_import_tar
from cocoonplan.model import Mode
from cocoonplan.nodefs import Cap, Listing, Tree
from cocoonplan.observed import OWNERSHIP_FILE, Building, NodeState, ObservedVM, Owner
from cocoonplan.planner.diff import RecordDifference, record_differences
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


def left_to_cocoon(steps: Sequence[Step], target: NodeTarget) -> list[Step]:
    """The steps of ``steps`` only the node's cocoon can carry out, when apply runs without it
    (``--content-only``): image records on a SQLite-engine node, whose store cocoonplan never
    writes (``cocoon image pull`` makes them, finding the content already in place)."""
    if target.cocoon is not None or target.engine is not MetadataEngine.SQLITE:
        return []
    return [step for step in steps if step.kind is StepKind.RECORD_IMAGE]


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
    if local is not None and not _pending(_cli(target, step), step.detail):
        _check_reused(vm, local.id, target.local)
        return
    config = next(b for b in vm.blobs if b.kind is BlobKind.SNAPSHOT_CONFIG)
    if config.present:
        # The plan reused the node's import and fetched none of its files: nothing to import from.
        raise ApplyError(
            f"the plan reuses snapshot {step.detail} on node {step.node}, which is "
            + ("gone" if local is None else "unfinished (pending)")
            + " now",
            hint="plan again: the new plan fetches the snapshot's files and imports it",
        )
    if local is not None:
        _cli(target, step).run(["snapshot", "rm", step.detail])
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


def change_vm(
    plan: Plan, step: Step, world: World, outcome: Outcome, resumed: Mapping[str, str | None]
) -> None:
    """One ``cocoon vm`` command of a VM step; a created VM's ID is what cocoon printed.

    ``resumed`` (from :func:`resumed_builds`) names what an interrupted apply of this same plan
    already removed or created: that is not done again."""
    target = world.targets[step.node]
    cli = _cli(target, step)
    vm = _vm(plan, step)
    if step.kind is StepKind.REMOVE_VM:
        outcome.removed.add(step.detail)
        if vm.name in resumed:
            return
        if _builds(vm):
            note_building(plan, vm, target.local)
        cli.run(["vm", "rm", "--force", step.detail])
        forget_removed(step.detail, target.local)
    elif step.kind is StepKind.CREATE_VM:
        made = resumed.get(vm.name)
        outcome.created[vm.name] = made or create_vm(
            plan, vm, target.local, cli, world.read_state, target.rules
        )
    elif step.kind is StepKind.START_VM:
        cli.run(["vm", "start", vm.name])
    elif step.kind is StepKind.STOP_VM:
        cli.run(["vm", "stop", vm.name])


def _builds(vm: VMPlan) -> bool:
    return vm.action in (Action.CREATE, Action.REPLACE)


def create_vm(
    plan: Plan, vm: VMPlan, local: Path, cli: CocoonCLI, read_state: Callable[[str], NodeState], rules: Rules
) -> str:
    """``vm run``/``create``/``clone`` of ``vm``, recorded as cocoonplan's before and after
    cocoon runs (see the module docstring); returns the ID cocoon printed."""
    note_building(plan, vm, local)
    args = (
        run_arguments(vm)
        if vm.mode is Mode.RUN
        else clone_arguments(vm, snapshot_import_name(_source(vm)), rules)
    )
    try:
        vm_id = str(cli.record(args)["id"])
    except ApplyError:
        # cocoon refused: unless it left a VM of the name, nothing is being built any more, and
        # a VM someone makes under that name later must not pass for cocoonplan's.
        with contextlib.suppress(CocoonplanError):
            if read_state(vm.node).vm_named(vm.name) is None:
                _drop_building(vm.name, local)
        raise
    record_created(plan, vm, vm_id, local)
    return vm_id


def _source(vm: VMPlan) -> str:
    assert vm.source is not None
    return vm.source.digest


def _read_owned(local: Path) -> dict[str, Any]:
    data = read_bounded(local, OWNERSHIP_FILE, OWNERSHIP_LIMIT)
    if data is None:
        return {"format_version": 1, "vms": {}}
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ApplyError(f"{local / OWNERSHIP_FILE} cannot be read back: {exc}") from exc
    return document if isinstance(document, dict) else {"format_version": 1, "vms": {}}


def _write_owned(local: Path, document: dict[str, Any]) -> None:
    """Write ``owned.json`` whole or not at all; an empty ``building`` is left out."""
    document = {**document, "vms": dict(sorted((document.get("vms") or {}).items()))}
    if not document.get("building"):
        document.pop("building", None)
    write_atomic(local, OWNERSHIP_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")


def _owner(vm: VMPlan, observed: ObservedVM | None = None) -> dict[str, Any]:
    """The ownership entry of ``vm`` as planned, with the config and cmdline it runs when known."""
    assert vm.source is not None
    owner = Owner(
        name=vm.name,
        spec_file=vm.spec_file,
        source=vm.source.digest,
        source_ref=vm.source.ref,
        mode=vm.mode,
        config_sha256=observed.runtime_config_sha256 if observed else None,
        cmdline=observed.boot_config.cmdline if observed and observed.boot_config else None,
    )
    return owner.model_dump(mode="json", exclude_none=True)


def _building(plan: Plan, vm: VMPlan, vm_id: str | None = None) -> dict[str, Any]:
    entry = Building.model_validate({"plan": plan.digest, "owner": _owner(vm), "id": vm_id})
    return entry.model_dump(mode="json", exclude_none=True)


def note_building(plan: Plan, vm: VMPlan, local: Path) -> None:
    """Before cocoon is asked to remove or create ``vm``: record that ``plan`` builds it, so
    that a VM cocoon makes under its name is cocoonplan's even if apply dies before cocoon
    prints its ID."""
    document = _read_owned(local)
    building = {**(document.get("building") or {}), vm.name: _building(plan, vm)}
    _write_owned(local, {**document, "building": building})


def record_created(plan: Plan, vm: VMPlan, vm_id: str, local: Path) -> None:
    """Right after cocoon printed ``vm_id``: ``vm`` is cocoonplan's by that ID (its ``building``
    entry keeps the ID until the apply's ownership is recorded, for a resumed apply)."""
    document = _read_owned(local)
    vms = {**(document.get("vms") or {}), vm_id: _owner(vm)}
    building = {**(document.get("building") or {}), vm.name: _building(plan, vm, vm_id)}
    _write_owned(local, {**document, "vms": vms, "building": building})


def forget_removed(vm_id: str, local: Path) -> None:
    """Right after ``cocoon vm rm``: the VM ``vm_id`` is no longer cocoonplan's to record."""
    document = _read_owned(local)
    vms = {k: v for k, v in (document.get("vms") or {}).items() if k != vm_id}
    _write_owned(local, {**document, "vms": vms})


def _drop_building(name: str, local: Path) -> None:
    document = _read_owned(local)
    building = {k: v for k, v in (document.get("building") or {}).items() if k != name}
    _write_owned(local, {**document, "building": building})


def record_ownership(plan: Plan, node: str, local: Path, outcome: Outcome, state: NodeState) -> None:
    """Record the VMs apply created with the config and cmdline they run now (and forget those
    it removed) in ``cocoonplan/owned.json``, written atomically.

    What an interrupted apply was building is settled here: a VM of such a name on the node
    (``state`` attaches its ownership) is recorded by its ID, and every ``building`` entry is
    dropped. The applied plan's digest is not written here: see :func:`record_applied`."""
    document = _read_owned(local)
    building = document.get("building") or {}
    vms = {k: v for k, v in (document.get("vms") or {}).items() if k not in outcome.removed}
    for observed in state.vms:
        if observed.name in building and observed.owner is not None and observed.id not in vms:
            vms[observed.id] = _settled(observed.owner, observed)
    for name, vm_id in outcome.created.items():
        planned = next(vm for vm in plan.vms if vm.node == node and vm.name == name)
        vms[vm_id] = _owner(planned, next((vm for vm in state.vms if vm.id == vm_id), None))
    _write_owned(local, {**document, "vms": vms, "building": {}})


def _settled(owner: Owner, observed: ObservedVM) -> dict[str, Any]:
    """The ownership an interrupted apply meant ``observed`` to have, with what it runs now."""
    cmdline = observed.boot_config.cmdline if observed.boot_config else None
    settled = owner.model_copy(update={"config_sha256": observed.runtime_config_sha256, "cmdline": cmdline})
    return settled.model_dump(mode="json", exclude_none=True)


def record_applied(plan: Plan, local: Path) -> None:
    """Record ``plan``'s digest as ``applied_plan``: only once the post-apply proof passed, so
    the field always names the last plan the node was proven to run. A failed proof leaves
    the previous digest (the VMs created stay recorded as cocoonplan's)."""
    _write_owned(local, {**_read_owned(local), "applied_plan": plan.digest})


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
    record_ownership(plan, node, local, Outcome(created={name: observed.id}), state)
    return observed.id


def clear_staging(local: Path, digests: Collection[str] | None = None) -> None:
    """Remove staged blobs once nothing needs them: the blobs ``digests`` (content only: the
    layers converted, while snapshot files wait for the VM apply), else every file staged
    (the node's apply succeeded). A failed apply keeps them, so that a re-run resumes."""
    hint = "remove what is in the way under cocoonplan/staging, then apply again"
    with Tree.open(local, "cocoon root dir", hint) as tree:
        entries = tree.entries(STAGING, Listing.NODE_DIR) or {}
    wanted = None if digests is None else {blob_path(Path(), d).name for d in digests}
    for name, mode in sorted(entries.items()):
        # Only files: a directory or link there is none of cocoonplan's.
        if stat.S_ISREG(mode) and (wanted is None or name in wanted):
            remove_file(local, f"{STAGING}/{name}")


def _unchecked() -> None:
    """No lease to check: the caller holds none (tests of a single step)."""


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
    held: Callable[[], None] = _unchecked
    """Raises unless the node's lease is still this apply's; called before every step."""


def _targeted(vm: VMPlan, node: str, targets: Collection[str]) -> bool:
    return vm.node == node and (not targets or vm.name in targets)


def resumed_builds(
    plan: Plan, node: str, state: NodeState, local: Path, targets: Collection[str] = ()
) -> dict[str, str | None]:
    """What an earlier apply of this same ``plan``, interrupted, already did on ``node``: VM
    name -> the ID of the VM it created, or None when it removed the VM being replaced and
    created none yet. Read from ``owned.json``'s ``building`` entries of this plan's digest."""
    document = _read_owned(local)
    recorded = set(document.get("vms") or {})
    resumed: dict[str, str | None] = {}
    for vm in plan.vms:
        raw = (document.get("building") or {}).get(vm.name)
        if raw is None or not _targeted(vm, node, targets) or not _builds(vm):
            continue
        try:
            entry = Building.model_validate(raw)
        except ValueError as exc:
            raise ApplyError(
                f"{local / OWNERSHIP_FILE}: building entry of VM {vm.name} is not valid: {exc}"
            ) from exc
        if entry.plan != plan.digest:
            continue
        current = state.vm_named(vm.name)
        if current is None:
            if vm.action is Action.REPLACE:
                resumed[vm.name] = None
        elif current.id == entry.id or (
            entry.id is None and current.id not in recorded and current.id != vm.observed_id
        ):
            resumed[vm.name] = current.id
    return resumed


SHOWN_DIFFERENCES = 8
"""Differences a stale-plan message names per VM; the rest are counted."""
_RECORD_NAMES = {"settings": "config", "name": "config.name", "nics": "network_configs"}
"""ObservedVM fields by the names cocoon's VM record (vms.json) gives them."""
_VALUE_WIDTH = 60


def _shown(value: Any) -> str:
    """A value of a record, short enough for a one-line message."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def _said(difference: RecordDifference) -> str:
    path, op, before, after = difference
    where = dotted((_RECORD_NAMES.get(str(path[0]), str(path[0])), *path[1:]))
    if op is ChangeOp.ADD:
        return f"{where} added ({_shown(after)})"
    if op is ChangeOp.REMOVE:
        return f"{where} removed (was {_shown(before)})"
    return f"{where} {_shown(before)} → {_shown(after)}"


def changed_since(vm: VMPlan, current: ObservedVM) -> str:
    """What changed in the node's record of ``vm`` since the plan read it, field by field
    (``config.cpu 2 → 3``). A plan written before plans kept the record has only the state."""
    if vm.observed is None:
        state = f"state {vm.observed_state} → {current.state}" if vm.observed_state != current.state else ""
        return "the VM changed on the node" + (f" ({state})" if state else "")
    differences = record_differences(vm.observed, current)
    said = [_said(d) for d in differences[:SHOWN_DIFFERENCES]]
    if len(differences) > SHOWN_DIFFERENCES:
        said.append(f"and {len(differences) - SHOWN_DIFFERENCES} more")
    return "the VM changed on the node" + (": " + ", ".join(said) if said else "")


def check_fresh(
    plan: Plan, node: str, state: NodeState, targets: Sequence[str], resumed: Collection[str] = ()
) -> None:
    """Refuse a plan made against another state of ``node``: every VM it changes must be on the
    node exactly as observed then (its fingerprint), and every VM it creates still absent,
    unless an interrupted apply of this same plan built it (``resumed``)."""
    stale = []
    for vm in plan.vms:
        if vm.action is Action.NO_OP or not _targeted(vm, node, targets) or vm.name in resumed:
            continue
        current = state.vm_named(vm.name)
        if vm.observed_fingerprint is None and current is not None:
            stale.append(f"{vm.name}: a VM of this name appeared ({current.id})")
        elif vm.observed_fingerprint is not None and current is None:
            stale.append(f"{vm.name}: the VM is gone from the node")
        elif current is not None and vm.observed_fingerprint not in (None, current.fingerprint()):
            stale.append(f"{vm.name}: {changed_since(vm, current)}")
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


def _binding(planned: VMPlan, running: ObservedVM) -> dict[str, str]:
    """Each provisional value of a VM cocoon created -> what cocoon chose: its ID (and with it
    every run-dir path, socket and TAP derived from it), its NICs' TAPs and MACs."""
    pairs = {planned.vm_id: running.id}
    for nic, seen in zip(planned.interfaces, running.nics, strict=False):
        pairs |= {nic.tap: seen.tap, nic.mac: seen.mac}
    # Longest first: a TAP is made of a prefix of the ID.
    return {k: pairs[k] for k in sorted(pairs, key=len, reverse=True) if k and k != pairs[k]}


def _bound(value: Any, binding: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for planned, chosen in binding.items():
            value = value.replace(planned, chosen)
        return value
    if isinstance(value, dict):
        return {key: _bound(item, binding) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_bound(item, binding) for item in value]
    return value


def _unindexed(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "index"} if isinstance(value, dict) else value


def real_changes(vm: VMPlan, running: ObservedVM | None) -> list[Change]:
    """The changes of a re-planned ``vm`` that say the node differs from the plan, once its
    provisional values are bound to what cocoon chose for ``running``: a replace's changes
    carry the replacement's fresh ID, TAPs and MACs, which no VM on the node could have.

    Left out: changes that follow from another (``cause``, named by that one), changes that
    were only provisional values, and disks that only moved because disks before them are
    missing or extra (those are named)."""
    binding = _binding(vm, running) if running is not None else {}
    shifted = any(
        c.kind is ChangeKind.DISK and c.op in (ChangeOp.ADD, ChangeOp.REMOVE) and c.cause is None
        for c in vm.changes
    )
    real = []
    for change in vm.changes:
        if change.cause is not None:
            continue
        bound = change.model_copy(update={"after": _bound(change.after, binding)})
        if bound.op in (ChangeOp.UPDATE, ChangeOp.MOVE) and bound.after == change.before:
            continue
        if bound.op is ChangeOp.MOVE and shifted and _unindexed(bound.after) == _unindexed(change.before):
            continue
        real.append(bound)
    return real


def prove(plan: Plan, node: str, replanned: Plan, state: NodeState, targets: Collection[str] = ()) -> None:
    """The post-apply proof: planning again against the node (``state``, read after apply)
    must propose nothing and find no drift for every VM the plan touched (of ``targets``,
    when given); otherwise every differing field is named, provisional values bound first."""
    touched = {vm.name for vm in plan.vms if _targeted(vm, node, targets) and vm.action is not Action.NO_OP}
    problems = []
    for vm in replanned.vms:
        if vm.node != node or vm.name not in touched:
            continue
        if vm.action is not Action.NO_OP or vm.drift:
            running = next((seen for seen in state.vms if seen.id == vm.observed_id), None)
            fields = [_difference(c) for c in real_changes(vm, running)] + [
                f"drift {dotted(d.path)}: {d.message}" for d in vm.drift
            ]
            problems.append(f"{vm.name} ({vm.action}): {', '.join(fields) or vm.reason}")
    problems += [f"{e.vm}: {e.summary}" for e in replanned.errors if e.vm in touched]
    if problems:
        raise ApplyError(
            f"node {node} does not run what the plan says after apply: " + "; ".join(problems),
            hint="cocoon did not do what it was asked: inspect the VMs named, then plan again",
        )


_VM_STEPS = frozenset(
    {StepKind.IMPORT_SNAPSHOT, StepKind.REMOVE_VM, StepKind.CREATE_VM, StepKind.START_VM, StepKind.STOP_VM}
)


def apply_node(
    plan: Plan,
    steps: Sequence[Step],
    node: str,
    world: World,
    targets: Collection[str] = (),
    resumed: Mapping[str, str | None] | None = None,
) -> Outcome:
    """Carry out ``steps`` (all on ``node``, in order, compiled for ``targets``) and prove the
    result; the caller holds the node's lease and has checked the plan is fresh (``resumed``:
    what :func:`resumed_builds` found already done).

    ``owned.json`` records the VMs created whether or not the proof passes (they are
    cocoonplan's either way); its ``applied_plan`` is written only once the proof passed.
    The staged blobs are removed once the node's apply succeeded, kept when it failed."""
    target = world.targets[node]
    outcome = Outcome()
    world.held()
    staging = fetch_content(plan, steps, target, world.sources, world.progress)
    world.held()
    convert_content(plan, steps, target, staging)
    world.held()
    record_images(plan, steps, target, world.clock)
    for step in steps:
        if step.kind not in _VM_STEPS:
            continue
        world.held()
        if step.kind is StepKind.IMPORT_SNAPSHOT:
            import_snapshot(plan, step, target, staging, world.read_state(node))
        else:
            change_vm(plan, step, world, outcome, resumed or {})
    kinds = {step.kind for step in steps}
    if StepKind.RECORD_OWNERSHIP in kinds:
        world.held()
        record_ownership(plan, node, target.local, outcome, world.read_state(node))
    if StepKind.PROVE in kinds:
        prove(plan, node, world.replan(node), world.read_state(node), targets)
        world.held()
        record_applied(plan, target.local)
        clear_staging(target.local)
    else:
        clear_staging(
            target.local, [s.digest for s in steps if s.kind is StepKind.CONVERT_LAYER and s.digest]
        )
    outcome.done = list(steps)
    return outcome
