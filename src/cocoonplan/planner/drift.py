"""Drift: a VM on the node that is not what it should be, whatever its spec says.

Three kinds: its layers are not the layers of the image it was made from (the founding bug:
a clone on another image's layers); the running VMM was started with arguments cocoon would
not give it; or its files differ from what cocoonplan applied.
Each alien layer is named with every image on the node that contains it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import zip_longest

from cocoonplan.cocoon import DiskRole, layer_hex
from cocoonplan.model import Mode, hex_to_digest, short_digest
from cocoonplan.observed import ObservedImage, ObservedVM
from cocoonplan.planner.hypervisor import record_launch, restore_launch_command
from cocoonplan.planner.model import Change, ChangeKind, ChangeOp, Drift, DriftKind, FileCheck
from cocoonplan.planner.rules import RULES, Rules, rules_for
from cocoonplan.planner.tokens import launch_tokens, token_differences
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import NodeView, RunningBase

_AFFINITY = re.compile(r"queue_affinity=\[(?:[^\[\]]|\[[^\]]*\])*\]")


def layer_drift(vm: ObservedVM, base: RunningBase, images: Sequence[ObservedImage]) -> list[Drift]:
    """One entry per layer index where the VM's layer differs from its base image's."""
    found = [layer_hex(c) for c in vm.storage_configs if c.role is DiskRole.LAYER]
    whose = "the snapshot's base" if vm.mode is Mode.CLONE else "the image"
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
                kind=DriftKind.LAYER,
                path=("disks", index),
                expected=hex_to_digest(want),
                found=hex_to_digest(have),
                found_in=owners,
                message=message,
            )
        )
    return drift


def accepted_launches(vm: ObservedVM, node: NodeConfig, rules: Rules) -> list[tuple[str, ...]]:
    """Every argument list cocoon legitimately starts this VM with (§8a): a cold boot from its
    record (``vm run``, ``vm start``, a clone restarted), and, once a snapshot was restored into
    its run directory (``vm clone``, ``vm restore``), the API socket alone.

    A VM keeps running across an upgrade of the node's cocoon, so a cold boot by an earlier
    line's rules is legitimate too: its next start gives the current form.
    """
    forms = []
    lines = list(RULES)  # oldest first
    for line in lines[: lines.index(rules.line) + 1]:
        cold = record_launch(vm, node, RULES[line])
        if cold is not None:
            forms.append(cold)
    if vm.runtime_meta is not None:
        forms.append(restore_launch_command(f"{vm.run_dir}/api.sock"))
    return forms


def _comparable(line: str, rules: Rules) -> str:
    # Where cocoon picks queue affinity from live host load (v0.6), its value says nothing.
    return line if rules.queue_affinity_planned else _AFFINITY.sub("queue_affinity=*", line)


def launch_drift(vm: ObservedVM, node: NodeConfig, rules: Rules) -> list[Drift]:
    """The running VMM's arguments (``<run>/cmdline``) against every form cocoon writes.

    cocoon deletes the file on stop and rewrites it on start, so it says something only
    while the VM runs; without a form to compare with, nothing is claimed.
    """
    forms = accepted_launches(vm, node, rules)
    found = _comparable(vm.launch or "", rules)
    if (
        not vm.running
        or vm.launch is None
        or not forms
        or found in (_comparable(" ".join(f), rules) for f in forms)
    ):
        return []
    # Say which options differ from the nearest form, not two 4,000-character lines.
    tokens = launch_tokens(found.split())
    nearest = min(
        (token_differences(launch_tokens(_comparable(" ".join(f), rules).split()), tokens) for f in forms),
        key=len,
    )
    return [
        Drift(
            kind=DriftKind.LAUNCH,
            path=("launch",),
            expected=[" ".join(f) for f in forms],
            found=vm.launch,
            message="the VM runs with arguments cocoon would not start it with from its record "
            "(neither a cold boot nor a restore)",
            changes=tuple(
                Change(kind=ChangeKind.LAUNCH, path=("launch", *path), op=ChangeOp(op), before=old, after=new)
                for path, op, old, new in nearest
            ),
        )
    ]


def applied_drift(vm: ObservedVM) -> list[Drift]:
    """Files that differ from what cocoonplan recorded when it applied them."""
    owner = vm.owner
    if owner is None:
        return []
    recorded = vm.boot_config.cmdline if vm.boot_config else None
    # A file cocoonplan did not record, or (config.json) that the node lacks, says nothing;
    # nor does the config.json of a snapshot of the VM itself, which `vm restore` puts there.
    has_config = vm.runtime_config_sha256 is not None and not vm.restored
    checks = [
        ("config.json", owner.config_sha256, vm.runtime_config_sha256, has_config),
        ("cmdline", owner.cmdline, recorded, True),
    ]
    return [
        Drift(
            kind=DriftKind.APPLIED,
            path=(path,),
            expected=applied,
            found=found,
            message=f"the {path} on the node is not the one cocoonplan applied",
        )
        for path, applied, found, comparable in checks
        if applied is not None and comparable and found != applied
    ]


def file_drift_of(checks: Sequence[FileCheck]) -> tuple[Drift, ...]:
    """Failed file expectations on the node's layers, as drift entries (each keeps its check)."""
    return tuple(
        Drift(
            kind=DriftKind.FILE,
            path=("files", check.path),
            expected=check.expect.value,
            found="present" if check.found else "absent",
            found_in=tuple(f"{source.image} layer {source.layer}" for source in check.provided_by),
            message=check.message or f"{check.path}: expected {check.expect.value}",
            file=check,
        )
        for check in checks
    )


def drift_of(vm: ObservedVM, view: NodeView) -> tuple[Drift, ...]:
    """All drift of one VM on its node; without a known base its layers cannot be checked."""
    base = view.bases.get(vm.id)
    images = view.state.images if view.state else ()
    found = layer_drift(vm, base, images) if base is not None else []
    return tuple(found + launch_drift(vm, view.settings, rules_for(view)) + applied_drift(vm))
