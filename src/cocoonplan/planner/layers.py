"""The layer cross-check: a snapshot's declared layers must agree with every other record.

This is the check that would have caught cocoon issue #46: a clone running on the six
layers of ``ubuntu:24.04-xface-20260513`` instead of the eleven of ``ubuntu:24.04-xface``.
The layers are the ``role: layer`` entries of the snapshot's own ``cocoon.json``, in order
(cocoon uses them verbatim); they are checked against the snapshot's ``config.json`` disks,
the config blob's ``imageBlobIds``, the base image manifest fetched by the recorded
``imageDigest``, and ``expect.baseImage``. Any disagreement fails the plan with one line per
layer index, naming what each record says.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import zip_longest

from cocoonplan.cocoon import (
    BOOT_PATH,
    DiskRole,
    blob_path,
    boot_path,
    layer_hex,
    layer_serial,
    storage_config_problems,
)
from cocoonplan.errors import LayerMismatchError
from cocoonplan.model import hex_to_digest
from cocoonplan.resolved import PinnedRef, ResolvedSnapshot


class Findings:
    """Problems collected per layer index (one line each) and for the snapshot as a whole."""

    def __init__(self) -> None:
        self.by_layer: dict[int, list[str]] = defaultdict(list)
        self.general: list[str] = []
        # What cocoon.json names at each layer index: a digest, or the path when it names none.
        self.declared: list[str] = []

    def lines(self) -> list[str]:
        """One line per layer index, in index order, then the general problems."""
        out = []
        for index in sorted(self.by_layer):
            said = self.declared[index] if index < len(self.declared) else "(none)"
            out.append(f"layer {index}: cocoon.json says {said}; " + "; ".join(self.by_layer[index]))
        return out + self.general


def declared_layers(snapshot: ResolvedSnapshot, root_dir: str, findings: Findings) -> list[str]:
    """The snapshot's layer hexes from cocoon.json, in order, noting malformed entries."""
    hexes: list[str] = []
    seen_other = False
    for disk, config in enumerate(snapshot.meta.storage_configs):
        if config.role is not DiskRole.LAYER:
            seen_other = True
            continue
        index = len(hexes)
        found = layer_hex(config)
        if seen_other:
            findings.by_layer[index].append(f"it is disk {disk}, after a non-layer disk")
        if found is None:
            findings.by_layer[index].append(f"its path {config.path} is not a cocoon layer blob path")
        elif config.path != blob_path(root_dir, found):
            findings.by_layer[index].append(
                f"its path {config.path} is outside the node's root dir {root_dir}; cocoon keeps layer"
                " paths verbatim, so the clone would not find it"
            )
        if config.serial != layer_serial(index):
            findings.by_layer[index].append(f"its serial is {config.serial}, expected {layer_serial(index)}")
        hexes.append(found or "")
        findings.declared.append(hex_to_digest(found) or config.path)
    return hexes


def _check_config_disks(snapshot: ResolvedSnapshot, hexes: list[str], findings: Findings) -> None:
    disks = snapshot.ch_config.get("disks") or []
    configs = snapshot.meta.storage_configs
    if len(disks) != len(configs):
        findings.general.append(f"cocoon.json lists {len(configs)} disks but config.json lists {len(disks)}")
    layer_disks = {id(c): i for i, c in enumerate(c for c in configs if c.role is DiskRole.LAYER)}
    for index, (config, disk) in enumerate(zip_longest(configs, disks)):
        if config is None or disk is None or not isinstance(disk, dict):
            continue
        if disk.get("path") == config.path and bool(disk.get("readonly")) == config.ro:
            continue
        what = f"config.json disk {index} is {disk.get('path')} (readonly={str(bool(disk.get('readonly'))).lower()})"
        if id(config) in layer_disks:
            findings.by_layer[layer_disks[id(config)]].append(what)
        else:
            findings.general.append(
                f"disk {index}: cocoon.json {config.path} (ro={str(config.ro).lower()}) but {what}"
            )


def _check_blob_ids(snapshot: ResolvedSnapshot, hexes: list[str], findings: Findings) -> None:
    blob_ids = snapshot.config.image_blob_ids
    if not blob_ids:
        findings.general.append("the snapshot config blob records no imageBlobIds")
        return
    for index, hex_ in enumerate(hexes):
        if hex_ and hex_ not in blob_ids:
            findings.by_layer[index].append("the config blob's imageBlobIds do not hold it")
    findings.general += [
        f"the config blob's imageBlobIds hold sha256:{hex_}, which cocoon.json does not name as a layer"
        for hex_ in sorted(blob_ids - set(hexes))
    ]


def _check_base(snapshot: ResolvedSnapshot, hexes: list[str], findings: Findings) -> None:
    base = snapshot.base_image
    if base is None:
        findings.general.append(
            "the snapshot config blob records no base image (image and imageDigest), so its layers cannot be checked"
        )
        return
    where = f"base manifest {base.repository}@{base.pinned.digest} (config blob imageDigest)"
    base_hexes = [layer.digest.removeprefix("sha256:") for layer in base.layers]
    for index, (declared, expected) in enumerate(zip_longest(hexes, base_hexes)):
        if declared != expected:
            findings.by_layer[index].append(f"{where} says {hex_to_digest(expected) or '(none)'}")


def _check_boot(snapshot: ResolvedSnapshot, hexes: list[str], root_dir: str, findings: Findings) -> None:
    payload = snapshot.ch_config.get("payload") or {}
    for key in ("kernel", "initramfs"):
        path = payload.get(key)
        match = BOOT_PATH.fullmatch(path) if path else None
        if path and (
            match is None
            or match.group("hex") not in hexes
            or path != boot_path(root_dir, match.group("hex"), match.group("file"))
        ):
            findings.general.append(
                f"config.json payload.{key} {path} is not a boot file of the snapshot's layers under the node's root dir"
            )


def check_snapshot_layers(
    snapshot: ResolvedSnapshot, expected_base: PinnedRef | None, root_dir: str, vm: str
) -> tuple[str, ...]:
    """Return the snapshot's layer hexes in order, or raise LayerMismatchError listing every disagreement.

    cocoon's own checks of the disk list (``ValidateStorageConfigs``) are applied too, so a
    snapshot cocoon would refuse to clone is refused here first.
    """
    findings = Findings()
    configs = snapshot.meta.storage_configs
    layer_of = {
        disk: n for n, disk in enumerate(i for i, c in enumerate(configs) if c.role is DiskRole.LAYER)
    }
    for disk, problem in storage_config_problems(configs):
        if disk in layer_of:
            findings.by_layer[layer_of[disk]].append(problem)
        else:
            findings.general.append(f"disk {disk}: {problem}" if disk >= 0 else problem)
    hexes = declared_layers(snapshot, root_dir, findings)
    _check_config_disks(snapshot, hexes, findings)
    _check_blob_ids(snapshot, hexes, findings)
    _check_base(snapshot, hexes, findings)
    _check_boot(snapshot, hexes, root_dir, findings)
    recorded = snapshot.config.image_digest
    if expected_base is not None and expected_base.digest != recorded:
        findings.general.append(
            f"expect.baseImage {expected_base.ref} is {expected_base.digest}, but the snapshot was baked from "
            f"{snapshot.config.image} {recorded} (config blob imageDigest)"
        )
    lines = findings.lines()
    if lines:
        raise LayerMismatchError(
            f"VM {vm}: snapshot {snapshot.pinned.ref}@{snapshot.pinned.digest} does not agree with itself "
            f"about its {len(hexes)} base layers",
            detail="\n".join(f"  {line}" for line in lines),
            hint="rebuild or re-push the snapshot from the intended base image; cocoonplan never substitutes layers",
        )
    return tuple(hexes)
