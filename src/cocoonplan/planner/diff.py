"""The diff: a desired VM against the VM of the same name on the node, field by field.

cocoon v0.3.8 cannot change a VM's disks, CPUs, memory or configuration in place (it has
no ``vm update``), so any difference replaces the VM; the changed paths say why.
"""

from __future__ import annotations

from typing import Any

from deepdiff import DeepDiff
from deepdiff.helper import notpresent

from cocoonplan.cocoon import DiskRole, StorageConfig, layer_hex
from cocoonplan.observed import ObservedVM, comparable_config
from cocoonplan.planner.model import BlobKind, Change, ConfigOrigin, DesiredVM, PlannedDisk
from cocoonplan.planner.parts import planned_disk


def observed_disk(index: int, config: StorageConfig) -> PlannedDisk:
    """A disk of the node's VM record in the plan's terms (layers carry their digest)."""
    hex_ = layer_hex(config) if config.role is DiskRole.LAYER else None
    return planned_disk(index, config, f"sha256:{hex_}" if hex_ else None)


def _disk_view(disk: PlannedDisk) -> dict[str, Any]:
    view = disk.model_dump(mode="json", exclude={"index", "size"})
    if disk.role is not DiskRole.LAYER:
        # The node does not record which snapshot file a COW or data disk came from.
        view.pop("digest")
    return view


def _path(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    """config.json leaf by leaf (``config.disks[2].path``), in document order of the paths."""
    diff = DeepDiff(before, after, ignore_order=False, verbose_level=2)
    found: list[tuple[tuple[tuple[int, int | str], ...], Change]] = []
    for levels in diff.tree.values():
        for level in levels:
            parts = level.path(output_format="list")
            old = None if level.t1 is notpresent else level.t1
            new = None if level.t2 is notpresent else level.t2
            # Sort as the document reads: disks[2] before disks[10].
            key = tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in parts)
            found.append((key, Change(path="config" + _path(parts), before=old, after=new)))
    return [change for _, change in sorted(found, key=lambda item: item[0])]


def disk_changes(desired: DesiredVM, vm: ObservedVM) -> list[Change]:
    """Disks per index: changed, added (``before`` None) or removed (``after`` None)."""
    have = [observed_disk(i, c) for i, c in enumerate(vm.storage_configs)]
    changes = []
    for index in range(max(len(have), len(desired.disks))):
        old = _disk_view(have[index]) if index < len(have) else None
        new = _disk_view(desired.disks[index]) if index < len(desired.disks) else None
        if old != new:
            changes.append(Change(path=f"disks[{index}]", before=old, after=new))
    return changes


def blob_changes(desired: DesiredVM, vm: ObservedVM) -> list[Change]:
    """Layer blobs the VM gains (with size and whether the node has them) and loses."""
    have = {f"sha256:{h}" for c in vm.storage_configs if c.role is DiskRole.LAYER and (h := layer_hex(c))}
    want = {b.digest: b for b in desired.blobs if b.kind is BlobKind.LAYER}
    gained = [
        Change(path=f"blobs[{d}]", before=None, after={"size": want[d].size, "present": want[d].present})
        for d in sorted(want.keys() - have)
    ]
    lost = [
        Change(path=f"blobs[{d}]", before={"in_use": True}, after=None) for d in sorted(have - want.keys())
    ]
    return gained + lost


def diff_vm(desired: DesiredVM, vm: ObservedVM) -> tuple[Change, ...]:
    """Every difference between the VM on the node and the desired VM; empty when they agree.

    Only what cocoon keeps across a VM's life is compared: its record and, for a clone, the
    ``config.json`` cocoon wrote. The power state is not a difference (start and stop change
    it), and neither are runtime files, which cocoon deletes on stop and rewrites on start
    (their drift is reported by :mod:`cocoonplan.planner.drift`).
    """
    changes: list[Change] = []
    after_source = desired.source.digest if desired.source else None
    if vm.owner is not None and vm.owner.source != after_source:
        changes.append(Change(path="source.digest", before=vm.owner.source, after=after_source))
    if vm.mode is not desired.mode:
        changes.append(Change(path="mode", before=vm.mode.value, after=desired.mode.value))
    settings = vm.settings
    compared: list[tuple[str, int | str, int | str]] = [
        ("cpu", settings.cpu, desired.cpu),
        ("memory", settings.memory, desired.memory),
        ("storage", settings.storage, desired.storage),
        ("nics", len(vm.nics), desired.nics),
    ]
    # An empty network is the node's default, which is not known here: whatever network
    # cocoon recorded may be it, so it is no evidence of a difference.
    if desired.network:
        compared.append(("network", settings.network, desired.network))
    changes += [Change(path=field, before=old, after=new) for field, old, new in compared if old != new]
    changes += disk_changes(desired, vm)
    changes += blob_changes(desired, vm)
    if desired.config_origin is ConfigOrigin.WRITTEN:
        if vm.runtime_config is not None:
            # The node's copy is read as the VmConfig keys, credentials redacted: compare the
            # plan's the same way, or a key outside them would look changed on every plan.
            changes += config_changes(vm.runtime_config, comparable_config(desired.config))
        else:
            changes.append(Change(path="config", before=None, after="(the snapshot's config.json, patched)"))
    recorded = vm.boot_config.cmdline if vm.boot_config else None
    if recorded != desired.cmdline:
        changes.append(Change(path="cmdline", before=recorded, after=desired.cmdline))
    return tuple(changes)


def replace_paths(changes: tuple[Change, ...]) -> tuple[str, ...]:
    """The top-level fields that force the replace (``disks``, ``config``, ``cpu``, …)."""
    return tuple(sorted({c.path.split(".")[0].split("[")[0] for c in changes}))
