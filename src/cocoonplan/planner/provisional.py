"""What a plan cannot know before cocoon creates the VM: the values it draws at create time.

cocoon draws a VM's ID at random, CNI picks its MACs and leases its addresses, and the TAPs,
the run directory, the API socket, the launch arguments and parts of ``config.json`` follow
from those. A plan shows them as cocoonplan expects them, so that paths are concrete, and
marks them provisional. Which values those are is found, not listed: a value is provisional
exactly when it changes with the identity cocoon draws, so the VM is compiled under two
different identities and every path where the two disagree is provisional.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cocoonplan.planner.model import ConfigOrigin, DesiredVM
from cocoonplan.planner.rules import Rules

ADDRESS_NOTE = (
    "CNI leases each NIC's address at create time: cocoon then adds "
    "ip=<address>::<gateway>:<netmask>:<name>:eth<N>:off[:<dns>] to the cmdline (bridge NICs get none)"
)
AFFINITY_NOTE = (
    "cocoon v0.6 picks each writable disk's queue affinity from live host load at every launch: "
    "the planned queue_affinity is a placeholder"
)
_DISPLAY_ONLY = frozenset({"provisional", "notes"})


def _differing(first: Any, second: Any, path: str) -> Iterator[str]:
    if first == second:
        return  # compared in C: most of a VM is the same under both identities
    if isinstance(first, dict) and isinstance(second, dict):
        for key in first.keys() | second.keys():
            yield from _differing(first.get(key), second.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        for index, (one, other) in enumerate(zip(first, second, strict=True)):
            yield from _differing(one, other, f"{path}[{index}]")
    elif first != second:
        yield path


def _order(path: str) -> tuple[tuple[int, int | str], ...]:
    # launch[2] before launch[10].
    parts = path.replace("[", ".[").split(".")
    return tuple((0, int(p[1:-1])) if p.startswith("[") else (1, p) for p in parts)


def provisional_paths(one: DesiredVM, other: DesiredVM) -> tuple[str, ...]:
    """Paths (``vm_id``, ``disks[6].path``, ``config.net[0].mac``, ``launch[3]``, …) whose values
    differ between two compilations of one VM under two identities, sorted (indices as numbers).

    A VM with NICs also gets its addresses and its kernel cmdline: CNI leases them at create
    time and cocoon writes them into the cmdline, which no second identity reveals. So do the
    copies of that cmdline: the launch's ``--cmdline`` value, and the derived VmConfig's
    ``payload.cmdline`` (a clone's ``config.json`` keeps its source's, which cocoon does not touch).
    """
    # Only the fields that differ are dumped: most of a VM (its blobs, most of its disks and
    # config) is the same under both identities, and dumping it is most of the cost.
    differ = {
        name
        for name in type(one).model_fields
        if name not in _DISPLAY_ONLY and getattr(one, name) != getattr(other, name)
    }
    first, second = (vm.model_dump(mode="json", include=differ) for vm in (one, other))
    paths = set(_differing(first, second, ""))
    for nic in one.interfaces:
        paths.add(f"interfaces[{nic.index}].address")
    if one.interfaces:
        paths.update(_cmdline_paths(one))
    return tuple(sorted(paths, key=_order))


def _cmdline_paths(vm: DesiredVM) -> Iterator[str]:
    """``cmdline`` and every copy of it cocoon derives: the launch's ``--cmdline`` value and,
    where the VmConfig is derived from the launch (run mode), its ``payload.cmdline``."""
    yield "cmdline"
    for index, arg in enumerate(vm.launch[:-1]):
        if arg == "--cmdline":
            yield f"launch[{index + 1}]"
    payload = vm.config.get("payload")
    if vm.config_origin is ConfigOrigin.DERIVED and isinstance(payload, dict) and "cmdline" in payload:
        yield "config.payload.cmdline"


def mark_provisional(one: DesiredVM, paths: tuple[str, ...]) -> DesiredVM:
    """``one`` with its provisional ``paths`` and, when it has NICs, the note on their addresses."""
    notes = one.notes + ((ADDRESS_NOTE,) if one.interfaces else ())
    merged = (*paths, *one.provisional)
    return one.model_copy(update={"provisional": tuple(sorted(set(merged), key=_order)), "notes": notes})


def mark_host_chosen(vm: DesiredVM, rules: Rules) -> DesiredVM:
    """``vm`` with the values its node's cocoon picks from live host state at every launch.

    Later cocoon chooses writable disks' queue affinity from host load (``queue_affinity`` in
    the launch and in the VmConfig): the plan keeps v0.3.8's shape and marks it provisional.
    """
    if rules.queue_affinity_planned:
        return vm
    paths = [f"launch[{i}]" for i, arg in enumerate(vm.launch) if "queue_affinity=" in arg]
    paths += [
        f"config.disks[{i}].queue_affinity"
        for i, disk in enumerate(vm.config.get("disks") or ())
        if isinstance(disk, dict) and disk.get("queue_affinity")
    ]
    if not paths:
        return vm
    merged = tuple(sorted({*vm.provisional, *paths}, key=_order))
    return vm.model_copy(update={"provisional": merged, "notes": (*vm.notes, AFFINITY_NOTE)})
