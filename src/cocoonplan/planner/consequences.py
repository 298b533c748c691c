"""Which change follows from which, so that one fact is said once.

A layer swapped at ``disks[2]`` also changes ``config.disks[2].path`` and trades one blob for
another; five layers inserted change ``cocoon.layers`` and renumber every later device's
``_diskN`` id; ``cpu: 2 → 4`` changes ``--cpus boot`` and every disk's ``num_queues``. Each
such change gets the path of its fact as ``cause``; a change no rule explains stands alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from cocoonplan.planner.model import Change, ChangeKind, ChangeOp, ChangePath

_POSITIONAL_ID = re.compile(r"^_[a-z]+\d+$")
"""Cloud Hypervisor's default device ids (``_disk8``, ``_net13``): they count devices."""
_CPU_KEYS = frozenset({"num_queues", "queue_affinity"})


def _resource(path: ChangePath) -> str | None:
    """The resource setting a config or launch field follows from, if any."""
    head = path[1] if len(path) > 1 else None
    if head in ("--cpus", "cpus") or _CPU_KEYS & set(path):
        return "cpu"
    if head in ("--memory", "memory", "--balloon", "balloon"):
        return "memory"
    return None


def _first(changes: Sequence[Change], test: Callable[[Change], bool]) -> ChangePath | None:
    return next((change.path for change in changes if test(change)), None)


def _shifts(change: Change, role: str | None = None) -> bool:
    """A disk added or removed (of ``role``): every later device changes index."""
    side = change.after if change.op is ChangeOp.ADD else change.before
    return (
        change.kind is ChangeKind.DISK
        and change.op in (ChangeOp.ADD, ChangeOp.REMOVE)
        and (role is None or (isinstance(side, dict) and side.get("role") == role))
    )


def attribute(changes: Sequence[Change]) -> tuple[Change, ...]:
    """``changes`` with the ``cause`` of each that follows from another."""
    paths = {change.path for change in changes}
    layer_shift = _first(changes, lambda c: _shifts(c, "layer"))
    disk_shift = _first(changes, _shifts)
    cmdline = _first(changes, lambda c: c.kind is ChangeKind.CMDLINE)
    layer_of: dict[str, ChangePath] = {}
    for change in changes:
        if change.kind is ChangeKind.DISK:
            for side in (change.before, change.after):
                if isinstance(side, dict) and side.get("digest"):
                    layer_of.setdefault(str(side["digest"]), change.path)

    def cause(change: Change) -> ChangePath | None:
        path = change.path
        if change.kind is ChangeKind.BLOB:
            return layer_of.get(str(path[1]))
        if change.kind is ChangeKind.CMDLINE:
            return layer_shift if path[1:2] == ("cocoon.layers",) else None
        if change.kind not in (ChangeKind.CONFIG, ChangeKind.LAUNCH):
            return None
        head = path[1] if len(path) > 1 else None
        if head in ("disks", "--disk") and len(path) > 2 and ("disks", path[2]) in paths:
            return ("disks", path[2])
        if path[1:3] == ("payload", "cmdline") or head == "--cmdline":
            return cmdline
        if path[-1] == "id" and all(
            isinstance(v, str) and _POSITIONAL_ID.match(v)
            for v in (change.before, change.after)
            if v is not None
        ):
            return disk_shift
        if head in ("net", "--net") and change.op in (ChangeOp.ADD, ChangeOp.REMOVE) and ("nics",) in paths:
            return ("nics",)
        resource = _resource(path)
        if resource is not None and (resource,) in paths:
            return (resource,)
        return None

    return tuple(change.model_copy(update={"cause": cause(change)}) for change in changes)
