"""Drift: a VM on the node that is not what it should be, whatever its spec says.

Two kinds: its layers are not the layers of the image it was made from (the founding bug:
a clone on another image's layers), or its runtime files differ from what cocoonplan applied.
Each alien layer is named with every image on the node that contains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import zip_longest

from cocoonplan.cocoon import DiskRole, layer_hex
from cocoonplan.model import hex_to_digest, short_digest
from cocoonplan.observed import ObservedImage, ObservedVM
from cocoonplan.planner.model import Drift
from cocoonplan.resolved import RunningBase


def layer_drift(vm: ObservedVM, base: RunningBase, images: Sequence[ObservedImage]) -> list[Drift]:
    """One entry per layer index where the VM's layer differs from its base image's."""
    found = [layer_hex(c) for c in vm.storage_configs if c.role is DiskRole.LAYER]
    whose = "the snapshot's base" if vm.runtime_meta is not None else "the image"
    drift = []
    for index, (have, want) in enumerate(
        zip_longest(found, [d.removeprefix("sha256:") for d in base.layers])
    ):
        if have == want:
            continue
        owners = tuple(sorted(i.ref for i in images if have and f"sha256:{have}" in i.layers))
        if have is None:
            message = f"layer{index} {short_digest(want or '')} of {whose} {base.ref} is missing"
        else:
            message = (
                f"layer{index} {short_digest(have)} belongs to {', '.join(owners) or 'no image on the node'}, "
                f"not to {whose} {base.ref}"
            )
        drift.append(
            Drift(
                path=f"disks[{index}]",
                expected=hex_to_digest(want),
                found=hex_to_digest(have),
                found_in=owners,
                message=message,
            )
        )
    return drift


def applied_drift(vm: ObservedVM) -> list[Drift]:
    """Runtime files that differ from what cocoonplan recorded when it applied them."""
    owner = vm.owner
    if owner is None:
        return []
    drift = []
    current = vm.runtime_config_sha256
    if owner.config_sha256 and current is not None and current != owner.config_sha256:
        drift.append(
            Drift(
                path="config.json",
                expected=owner.config_sha256,
                found=current,
                message="the runtime config.json is not the one cocoonplan applied",
            )
        )
    observed = {"launch": vm.launch, "cmdline": vm.boot_config.cmdline if vm.boot_config else None}
    for field, applied in (("launch", owner.launch), ("cmdline", owner.cmdline)):
        if applied is not None and observed[field] != applied:
            drift.append(
                Drift(
                    path=field,
                    expected=applied,
                    found=observed[field],
                    message=f"the {field} on the node is not the one cocoonplan applied",
                )
            )
    return drift


def drift_of(vm: ObservedVM, base: RunningBase | None, images: Sequence[ObservedImage]) -> tuple[Drift, ...]:
    """All drift of one VM; without a known base only the applied files can be checked."""
    found = layer_drift(vm, base, images) if base is not None else []
    return tuple(found + applied_drift(vm))
