"""The layer cross-check: a snapshot's declared layers must agree with every other record.

This is the check that would have caught cocoon issue #46: a clone running on the six
layers of ``ubuntu:24.04-xface-20260513`` instead of the eleven of ``ubuntu:24.04-xface``.
The layers are the ``role: layer`` entries of the snapshot's own ``cocoon.json``, in order
(cocoon uses them verbatim); they are checked against the snapshot's ``config.json`` disks,
the config blob's ``imageBlobIds``, the base image manifest fetched by the recorded
``imageDigest``, and ``expect.baseImage``. Any disagreement fails with one line per index.
"""

from __future__ import annotations

from itertools import zip_longest

from cocoonplan.cocoon import BOOT_PATH, DiskRole, layer_hex, layer_serial
from cocoonplan.errors import LayerMismatchError
from cocoonplan.resolved import PinnedRef, ResolvedSnapshot


def _digest(hex_or_none: str | None) -> str:
    return f"sha256:{hex_or_none}" if hex_or_none else "(none)"


def declared_layers(snapshot: ResolvedSnapshot, root_dir: str) -> tuple[list[str], list[str]]:
    """Return the snapshot's layer hexes from cocoon.json, and any problems with the entries."""
    hexes: list[str] = []
    problems: list[str] = []
    seen_other = False
    for index, config in enumerate(snapshot.meta.storage_configs):
        if config.role is not DiskRole.LAYER:
            seen_other = True
            continue
        if seen_other:
            problems.append(
                f"disk {index}: layer {config.serial} comes after a non-layer disk in cocoon.json"
            )
        found = layer_hex(config)
        expected_path = f"{root_dir.rstrip('/')}/oci/blobs/"
        if found is None:
            problems.append(
                f"layer {len(hexes)}: cocoon.json path {config.path} is not a cocoon layer blob path"
            )
        elif not config.path.startswith(expected_path):
            problems.append(
                f"layer {len(hexes)}: cocoon.json path {config.path} is outside the node's root dir {root_dir};"
                " cocoon keeps layer paths verbatim, so the clone would not find it"
            )
        if config.serial != layer_serial(len(hexes)):
            problems.append(
                f"layer {len(hexes)}: cocoon.json serial {config.serial}, expected {layer_serial(len(hexes))}"
            )
        if not config.ro:
            problems.append(f"layer {len(hexes)}: cocoon.json marks the layer writable")
        hexes.append(found or "")
    return hexes, problems


def _config_disk_problems(snapshot: ResolvedSnapshot) -> list[str]:
    disks = snapshot.ch_config.get("disks") or []
    configs = snapshot.meta.storage_configs
    problems = []
    if len(disks) != len(configs):
        problems.append(f"cocoon.json lists {len(configs)} disks but config.json lists {len(disks)}")
    for index, (config, disk) in enumerate(zip_longest(configs, disks)):
        if config is None or disk is None or not isinstance(disk, dict):
            continue
        if disk.get("path") != config.path or bool(disk.get("readonly")) != config.ro:
            problems.append(
                f"disk {index}: cocoon.json {config.path} (ro={str(config.ro).lower()}) but config.json "
                f"{disk.get('path')} (readonly={str(bool(disk.get('readonly'))).lower()})"
            )
    return problems


def _blob_id_problems(snapshot: ResolvedSnapshot, hexes: list[str]) -> list[str]:
    blob_ids = snapshot.config.image_blob_ids
    if not blob_ids:
        return ["the snapshot config blob records no imageBlobIds"]
    problems = [
        f"layer {index}: cocoon.json {_digest(hex_)} is not in the config blob's imageBlobIds"
        for index, hex_ in enumerate(hexes)
        if hex_ and hex_ not in blob_ids
    ]
    problems += [
        f"config blob imageBlobIds holds sha256:{hex_}, which is not a layer in cocoon.json"
        for hex_ in sorted(blob_ids - set(hexes))
    ]
    return problems


def _base_problems(snapshot: ResolvedSnapshot, hexes: list[str]) -> list[str]:
    base = snapshot.base_image
    if base is None:
        return ["the snapshot config blob records no imageDigest, so its base image cannot be checked"]
    where = f"base manifest {base.repository}@{base.pinned.digest} (config blob imageDigest)"
    base_hexes = [layer.digest.removeprefix("sha256:") for layer in base.layers]
    problems = []
    for index, (declared, expected) in enumerate(zip_longest(hexes, base_hexes)):
        if declared != expected:
            problems.append(f"layer {index}: cocoon.json {_digest(declared)} ≠ {where} {_digest(expected)}")
    return problems


def _boot_problems(snapshot: ResolvedSnapshot, hexes: list[str]) -> list[str]:
    payload = snapshot.ch_config.get("payload") or {}
    problems = []
    for key in ("kernel", "initramfs"):
        path = payload.get(key)
        if not path:
            continue
        match = BOOT_PATH.match(path)
        if match is None or match.group("hex") not in hexes:
            problems.append(f"config.json payload.{key} {path} is not a boot file of the snapshot's layers")
    return problems


def check_snapshot_layers(
    snapshot: ResolvedSnapshot, expected_base: PinnedRef | None, root_dir: str, vm: str
) -> tuple[str, ...]:
    """Return the snapshot's layer hexes in order, or raise LayerMismatchError listing every disagreement."""
    hexes, problems = declared_layers(snapshot, root_dir)
    problems += _config_disk_problems(snapshot)
    problems += _blob_id_problems(snapshot, hexes)
    problems += _base_problems(snapshot, hexes)
    problems += _boot_problems(snapshot, hexes)
    recorded = snapshot.config.image_digest
    if expected_base is not None and expected_base.digest != recorded:
        problems.append(
            f"expect.baseImage {expected_base.ref} is {expected_base.digest}, but the snapshot was baked from "
            f"{snapshot.config.image} {recorded} (config blob imageDigest)"
        )
    if problems:
        raise LayerMismatchError(
            f"VM {vm}: snapshot {snapshot.pinned.ref}@{snapshot.pinned.digest} does not agree with itself "
            f"about its {len(hexes)} base layers",
            detail="\n".join(f"  {line}" for line in problems),
            hint="rebuild or re-push the snapshot from the intended base image; cocoonplan never substitutes layers",
        )
    return tuple(hexes)
