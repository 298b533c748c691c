"""The diff: a desired VM against the VM of the same name on the node, as typed changes.

cocoon v0.3.8 cannot change a VM's disks, CPUs, memory or configuration in place (it has
no ``vm update``), so any difference replaces the VM. Disks are paired by serial, never by
index, so a disk that moved is a move and a layer inserted below it an insertion; the
command line and the launch arguments are compared token by token. Which change follows
from which is decided afterwards, by :mod:`cocoonplan.planner.consequences`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from deepdiff import DeepDiff
from deepdiff.helper import notpresent

from cocoonplan.cocoon import DiskRole, StorageConfig, layer_hex
from cocoonplan.model import Mode
from cocoonplan.observed import ObservedVM, comparable_config
from cocoonplan.planner.consequences import attribute
from cocoonplan.planner.model import (
    BlobKind,
    Change,
    ChangeKind,
    ChangeOp,
    ChangePath,
    ConfigOrigin,
    DesiredVM,
    PathPart,
    PlannedDisk,
)
from cocoonplan.planner.parts import planned_disk
from cocoonplan.planner.tokens import cmdline_tokens, launch_tokens, token_differences


def observed_disk(index: int, config: StorageConfig) -> PlannedDisk:
    """A disk of the node's VM record in the plan's terms (layers carry their digest)."""
    hex_ = layer_hex(config) if config.role is DiskRole.LAYER else None
    return planned_disk(index, config, f"sha256:{hex_}" if hex_ else None)


def _disk_view(disk: PlannedDisk) -> dict[str, Any]:
    view = disk.model_dump(mode="json", exclude={"size"})
    if disk.role is not DiskRole.LAYER:
        # The node does not record which snapshot file a COW or data disk came from.
        view.pop("digest")
    return view


def _op(before: Any, after: Any) -> ChangeOp:
    return (
        ChangeOp.ADD if before is notpresent else ChangeOp.REMOVE if after is notpresent else ChangeOp.UPDATE
    )


def _present(value: Any) -> Any:
    return None if value is notpresent else value


def _change(
    kind: ChangeKind, path: ChangePath, before: Any, after: Any, op: ChangeOp | None = None
) -> Change:
    return Change(
        kind=kind, path=path, op=op or _op(before, after), before=_present(before), after=_present(after)
    )


def disk_changes(desired: DesiredVM, vm: ObservedVM) -> list[Change]:
    """Disks paired by serial, in the plan's order: added, updated, moved (to another index),
    then those removed. A serial the node holds twice pairs its first disk only."""
    have: dict[str, PlannedDisk] = {}
    spare: list[PlannedDisk] = []
    for index, config in enumerate(vm.storage_configs):
        disk = observed_disk(index, config)
        if disk.serial in have:
            spare.append(disk)
        else:
            have[disk.serial] = disk
    changes = []
    for disk in desired.disks:
        old = have.pop(disk.serial, None)
        if old is None:
            changes.append(_change(ChangeKind.DISK, ("disks", disk.serial), notpresent, _disk_view(disk)))
            continue
        before, after = _disk_view(old), _disk_view(disk)
        if before != after:
            op = ChangeOp.MOVE if old.index != disk.index else ChangeOp.UPDATE
            changes.append(_change(ChangeKind.DISK, ("disks", disk.serial), before, after, op))
    removed: list[tuple[ChangePath, PlannedDisk]] = [(("disks", old.serial), old) for old in have.values()]
    removed += [(("disks", old.index), old) for old in spare]  # by index: its serial is taken
    changes += [_change(ChangeKind.DISK, path, _disk_view(old), notpresent) for path, old in removed]
    return changes


def blob_changes(desired: DesiredVM, vm: ObservedVM) -> list[Change]:
    """Layer blobs the VM gains (with size and whether the node has them) and loses."""
    have = {f"sha256:{h}" for c in vm.storage_configs if c.role is DiskRole.LAYER and (h := layer_hex(c))}
    want = {b.digest: b for b in desired.blobs if b.kind is BlobKind.LAYER}
    gained = [
        _change(ChangeKind.BLOB, ("blobs", d), notpresent, {"size": want[d].size, "present": want[d].present})
        for d in sorted(want.keys() - have)
    ]
    lost = [
        _change(ChangeKind.BLOB, ("blobs", d), {"in_use": True}, notpresent)
        for d in sorted(have - want.keys())
    ]
    return gained + lost


def _serials(config: dict[str, Any]) -> list[str] | None:
    """The serials of ``config``'s disks, when every disk has a distinct one."""
    disks = config.get("disks")
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        return None
    serials = [d.get("serial") for d in disks]
    if not all(isinstance(s, str) for s in serials) or len(set(serials)) != len(serials):
        return None
    return [str(s) for s in serials]


def _by_serial(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both configs with their ``disks`` keyed by serial, so that the config's disks pair as
    the plan's disks do; both as they are when either cannot be keyed."""
    old, new = _serials(before), _serials(after)
    if old is None or new is None:
        return before, after
    return (
        {**before, "disks": dict(zip(old, before["disks"], strict=True))},
        {**after, "disks": dict(zip(new, after["disks"], strict=True))},
    )


def _leaves(before: Any, after: Any) -> Iterator[tuple[tuple[PathPart, ...], Any, Any]]:
    """Every leaf where ``after`` differs from ``before``: its path, and its value on each side
    (``notpresent`` on a side that lacks it), in no particular order."""
    diff = DeepDiff(before, after, ignore_order=False, verbose_level=2)
    for levels in diff.tree.values():
        for level in levels:
            yield tuple(level.path(output_format="list")), level.t1, level.t2


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    """config.json leaf by leaf (``["config", "disks", "cocoon-cow", "path"]``), in document
    order, disks in the plan's order."""
    old, new = _by_serial(before, after)
    keyed = [side["disks"] for side in (new, old) if isinstance(side.get("disks"), dict)]
    order = {serial: i for i, serial in enumerate(serial for disks in keyed for serial in disks)}
    found: list[tuple[tuple[tuple[int, int | str], ...], Change]] = []
    for parts, old_value, new_value in _leaves(old, new):
        key = tuple(
            (0, order.get(p, 0))
            if i == 1 and parts[0] == "disks"
            else (0, p)
            if isinstance(p, int)
            else (1, str(p))
            for i, p in enumerate(parts)
        )
        found.append((key, _change(ChangeKind.CONFIG, ("config", *parts), old_value, new_value)))
    return [change for _, change in sorted(found, key=lambda item: item[0])]


RecordDifference = tuple[ChangePath, ChangeOp, Any, Any]
"""Where two readings of a VM record differ: (path, op, before, after); None on the side an
``add`` or ``remove`` lacks."""


def record_differences(before: ObservedVM, after: ObservedVM) -> list[RecordDifference]:
    """A VM's record on the node against an earlier reading of it, leaf by leaf, in the
    record's field order (``("settings", "cpu")``, ``("state",)``). Empty exactly when both
    readings have one fingerprint: every field the fingerprint hashes is compared."""
    fields = list(ObservedVM.model_fields)

    def order(path: ChangePath) -> tuple[int, list[tuple[int, int | str]]]:
        # Indices as numbers: disk 2 before disk 10.
        return fields.index(str(path[0])), [(0, p) if isinstance(p, int) else (1, str(p)) for p in path[1:]]

    found = [
        (path, _op(old, new), _present(old), _present(new))
        for path, old, new in _leaves(before.model_dump(mode="json"), after.model_dump(mode="json"))
    ]
    return sorted(found, key=lambda difference: order(difference[0]))


def _token_changes(kind: ChangeKind, differences: Sequence[tuple[ChangePath, str, Any, Any]]) -> list[Change]:
    return [
        Change(kind=kind, path=(kind.value, *path), op=ChangeOp(op), before=before, after=after)
        for path, op, before, after in differences
    ]


def cmdline_changes(before: str | None, after: str) -> list[Change]:
    """The kernel command line parameter by parameter."""
    if before is None:
        return [Change(kind=ChangeKind.CMDLINE, path=("cmdline",), op=ChangeOp.ADD, after=after)]
    return _token_changes(
        ChangeKind.CMDLINE, token_differences(cmdline_tokens(before), cmdline_tokens(after))
    )


def launch_changes(before: Sequence[str] | None, after: Sequence[str]) -> list[Change]:
    """The launch arguments option by option; nothing when the node's form is not known."""
    if before is None:
        return []
    return _token_changes(ChangeKind.LAUNCH, token_differences(launch_tokens(before), launch_tokens(after)))


def _field_changes(desired: DesiredVM, vm: ObservedVM) -> list[Change]:
    changes: list[Change] = []
    after_source = desired.source.digest if desired.source else None
    if vm.owner is not None and vm.owner.source != after_source:
        changes.append(_change(ChangeKind.SOURCE, ("source", "digest"), vm.owner.source, after_source))
    if vm.mode is not desired.mode:
        changes.append(_change(ChangeKind.MODE, ("mode",), vm.mode.value, desired.mode.value))
    settings = vm.settings
    compared: list[tuple[ChangeKind, str, int | str, int | str]] = [
        (ChangeKind.RESOURCES, "cpu", settings.cpu, desired.cpu),
        (ChangeKind.RESOURCES, "memory", settings.memory, desired.memory),
        (ChangeKind.RESOURCES, "storage", settings.storage, desired.storage),
        (ChangeKind.RESOURCES, "nics", len(vm.nics), desired.nics),
    ]
    # An empty network is the node's default, which is not known here: whatever network
    # cocoon recorded may be it, so it is no evidence of a difference.
    if desired.network:
        compared.append((ChangeKind.NETWORK, "network", settings.network, desired.network))
    return changes + [_change(kind, (field,), old, new) for kind, field, old, new in compared if old != new]


def diff_vm(
    desired: DesiredVM, vm: ObservedVM, node_launch: Sequence[str] | None = None
) -> tuple[Change, ...]:
    """Every difference between the VM on the node and the desired VM; empty when they agree.

    Only what cocoon keeps across a VM's life is compared: its record and, for a clone, the
    ``config.json`` cocoon wrote. The power state is not a difference (start and stop change
    it), and neither are runtime files, which cocoon deletes on stop and rewrites on start
    (their drift is reported by :mod:`cocoonplan.planner.drift`). ``node_launch`` is the
    launch cocoon would cold-boot the node's VM with from its record: a fresh run's launch
    differences are shown, as consequences of the others, but are never a cause of their own.
    """
    changes = _field_changes(desired, vm) + disk_changes(desired, vm) + blob_changes(desired, vm)
    # After `cocoon vm restore` the run dir's config.json is the one CH wrote when the VM itself
    # was snapshotted (its own NICs, CH's device IDs), not the artifact cocoon patched at clone:
    # it is no evidence of a difference, and the record still is.
    if desired.config_origin is ConfigOrigin.WRITTEN and not vm.restored:
        if vm.runtime_config is not None:
            # The node's copy is read as the VmConfig keys, credentials redacted: compare the
            # plan's the same way, or a key outside them would look changed on every plan.
            changes += config_changes(vm.runtime_config, comparable_config(desired.config))
        else:
            changes.append(
                Change(
                    kind=ChangeKind.CONFIG,
                    path=("config",),
                    op=ChangeOp.ADD,
                    after="(the snapshot's config.json, patched)",
                )
            )
    recorded = vm.boot_config.cmdline if vm.boot_config else None
    if recorded != desired.cmdline:
        changes += cmdline_changes(recorded, desired.cmdline)
    if changes and desired.mode is Mode.RUN:
        changes += launch_changes(node_launch, desired.launch)
    return attribute(changes)


def replace_paths(changes: Sequence[Change]) -> tuple[str, ...]:
    """The top-level fields of the changes that stand on their own (``disks``, ``cpu``, …)."""
    return tuple(sorted({str(c.path[0]) for c in changes if c.cause is None}))
