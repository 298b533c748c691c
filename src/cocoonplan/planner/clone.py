"""Clone planning: a hot snapshot cloned as ``cocoon vm clone`` does it (§8).

The disk list is the snapshot's own ``cocoon.json``, in order; layers keep their paths
verbatim, only the COW, data and cidata disks move into the clone's run directory, and the
snapshot's ``config.json`` is patched exactly where cocoon patches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cocoonplan.cocoon import (
    BOOT_PATH,
    DEFAULT_QUEUE_SIZE,
    DiskRole,
    StorageConfig,
    snapshot_import_name,
    vm_run_dir,
)
from cocoonplan.errors import PlanError
from cocoonplan.model import Mode
from cocoonplan.observed import NodeState, ObservedSnapshot
from cocoonplan.planner.hypervisor import (
    Tuning,
    build_cmdline,
    patch_clone_config,
    restore_launch_command,
    restore_requests,
)
from cocoonplan.planner.identity import Identity
from cocoonplan.planner.layers import check_snapshot_layers
from cocoonplan.planner.model import (
    BlobKind,
    ConfigOrigin,
    DesiredVM,
    LocalSnapshot,
    PlannedBlob,
    PlannedBootFile,
)
from cocoonplan.planner.parts import Target, check_host_cpus, layer_blobs, planned_disks, planned_nics
from cocoonplan.planner.rules import Rules
from cocoonplan.project import HypervisorBuild, NodeConfig
from cocoonplan.resolved import PinnedRef, ResolvedSnapshot, ResolvedVM
from cocoonplan.spec import LoadedSpec, RestoreMode


def at_least(vm: str, field: str, wanted: int | None, snapshot_value: int) -> int:
    """The clone's value of ``field``: the spec's, never below the snapshot's, else the snapshot's."""
    # cocoon v0.3.8 refuses clone values below the snapshot's: the guest already runs with them.
    if wanted is None:
        return snapshot_value
    if wanted < snapshot_value:
        raise PlanError(
            f"VM {vm}: {field} {wanted} is below the snapshot's {snapshot_value}",
            hint=f"a clone keeps at least the snapshot's {field}; raise it or leave it unset",
        )
    return wanted


def clone_value(vm: str, field: str, wanted: int | None, snapshot_value: int, rules: Rules) -> int:
    """The clone's ``cpu``, ``memory`` or ``storage``: v0.3.8 grows them at clone (never below the
    snapshot's); later cocoon clones with the snapshot's own, and a larger ask is refused."""
    if rules.clone_resizes or wanted is None or wanted == snapshot_value:
        return at_least(vm, field, wanted, snapshot_value)
    raise PlanError(
        f"VM {vm}: {field} {wanted} differs from the snapshot's {snapshot_value}, and cocoon "
        f"{rules.line} clones with the snapshot's own {field}",
        hint=f"leave {field} unset (or equal to the snapshot's); a different size needs a snapshot "
        "baked with it, or run mode",
    )


@dataclass(frozen=True)
class RestoreChoice:
    """The restore mode a clone is made with, and what a reviewer must know about the choice."""

    mode: RestoreMode
    note: str | None = None
    """Why cocoon's default is not what the clone gets (display only)."""
    warning: str | None = None
    """What cocoon warns about when it clones: the spec asks for a mode cocoon will not use."""


_STOCK_BUILD_NOTE = (
    "cocoon's default restore mode mmap needs cocoonstack's Cloud Hypervisor (CopyOnWrite); "
    "the node runs a stock build (cloudHypervisor: upstream), so the clone restores with copy"
)


def _eager_memory(snapshot: ResolvedSnapshot) -> str | None:
    """What makes the snapshot's memory unfit for mmap (hugepage-backed or shared); None when
    it is plain private memory."""
    memory = snapshot.ch_config.get("memory") or {}
    if not isinstance(memory, dict):
        return None
    kinds = [
        kind for kind, key in (("hugepage-backed", "hugepages"), ("shared", "shared")) if memory.get(key)
    ]
    return " and ".join(kinds) or None


def restore_mode(
    vm: str, wanted: RestoreMode | None, snapshot: ResolvedSnapshot, target: Target
) -> RestoreChoice:
    """The restore mode the clone is made with, checked against what the node can do.

    v0.3.8 knows copy and on-demand. Later cocoon (``resolveRestoreMode``, PRs #158/#159/#163)
    restores hugepage-backed or shared snapshot memory with copy, even when ``mmap`` is asked
    for (it warns and falls back), and defaults plain memory to ``mmap``; ``mmap`` sends
    ``CopyOnWrite``, which only cocoonstack's Cloud Hypervisor accepts, so on a stock build
    the plan passes ``copy`` rather than let the clone fail after its files are in place.
    """
    if not target.rules.restore_modes:
        if wanted is RestoreMode.MMAP:
            raise PlanError(
                f"VM {vm}: restoreMode mmap needs cocoon v0.6's --restore-mode; the node runs cocoon {target.rules.line}",
                hint="use restoreMode copy or ondemand",
            )
        return RestoreChoice(wanted or RestoreMode.COPY)
    eager = _eager_memory(snapshot)
    if eager is not None:
        # Checked before the build: cocoon never sends CopyOnWrite for such memory, so a
        # stock Cloud Hypervisor is no reason to refuse.
        if wanted is not None and wanted is not RestoreMode.MMAP:
            return RestoreChoice(wanted)
        if wanted is None:
            note = f"the snapshot's memory is {eager}, so cocoon restores it with copy, not its default mmap"
            return RestoreChoice(RestoreMode.COPY, note=note)
        return RestoreChoice(
            RestoreMode.COPY,
            warning=f"VM {vm}: restoreMode mmap needs plain private snapshot memory, and the snapshot's "
            f"memory is {eager}: cocoon falls back to copy (and warns), so the clone restores with copy; "
            "drop restoreMode, or bake the snapshot without hugepages or shared memory for mmap",
        )
    mode = wanted or RestoreMode.MMAP
    if mode is RestoreMode.MMAP and target.cloud_hypervisor is HypervisorBuild.UPSTREAM:
        if wanted is RestoreMode.MMAP:
            raise PlanError(
                f"VM {vm}: restoreMode mmap sends CopyOnWrite, which the node's stock Cloud Hypervisor refuses",
                hint="use restoreMode copy, or set cloudHypervisor: cocoonstack for a node that runs "
                "cocoonstack's build (`cocoon doctor --upgrade`; or export its state with "
                "--cloud-hypervisor cocoonstack)",
            )
        return RestoreChoice(RestoreMode.COPY, note=_STOCK_BUILD_NOTE)
    return RestoreChoice(mode)


def clone_nic_count(loaded: LoadedSpec, snapshot: ResolvedSnapshot) -> int:
    """NICs a clone gets: the spec's ``nics`` (at least the snapshot's), else the snapshot's."""
    return at_least(loaded.spec.name, "nics", loaded.spec.spec.nics, snapshot.config.nics)


def _clone_path(config: StorageConfig, run_dir: str) -> str:
    basename = config.path.rsplit("/", 1)[-1]
    if config.role is DiskRole.COW:
        return f"{run_dir}/{'overlay.qcow2' if basename.endswith('.qcow2') else 'cow.raw'}"
    if config.role is DiskRole.DATA:
        return f"{run_dir}/data-{config.serial}.raw"
    if config.role is DiskRole.CIDATA:
        return f"{run_dir}/cidata.img"
    return config.path


def _file_digest(snapshot: ResolvedSnapshot, config: StorageConfig) -> str | None:
    basename = config.path.rsplit("/", 1)[-1]
    return next((f.digest for f in snapshot.files if f.title == basename), None)


def _check_files(snapshot: ResolvedSnapshot, vm: str) -> None:
    # cocoon's validateSnapshotIntegrity: writable disk files, state.json and memory must exist.
    titles = {f.title for f in snapshot.files}
    wanted = {
        c.path.rsplit("/", 1)[-1]
        for c in snapshot.meta.storage_configs
        if c.role in (DiskRole.COW, DiskRole.DATA, DiskRole.CIDATA)
    }
    missing = sorted(wanted - titles) + ([] if "state.json" in titles else ["state.json"])
    if not any(t and t.startswith("memory-range") for t in titles):
        missing.append("memory-ranges")
    if missing:
        raise PlanError(
            f"VM {vm}: snapshot {snapshot.pinned.ref}@{snapshot.pinned.digest} lacks {', '.join(missing)}",
            hint="cocoon refuses to clone an incomplete snapshot; re-push it",
        )


def local_snapshot(snapshot: ResolvedSnapshot, state: NodeState | None) -> ObservedSnapshot | None:
    """The node's own record of this snapshot, if it has one: the record cocoonplan imports it
    under (named after its digest), else the record it was baked from (the artifact's
    ``snapshotId``, when the snapshot was taken on this node)."""
    if state is None:
        return None
    name = snapshot_import_name(snapshot.pinned.digest)
    by_name = next((s for s in state.snapshots if s.name == name), None)
    source_id = snapshot.config.snapshot_id
    return by_name or next((s for s in state.snapshots if source_id and s.id == source_id), None)


def _boot_file(
    vm: str, path: str | None, what: str, node: NodeConfig, state: NodeState | None, provider: str | None
) -> PlannedBootFile:
    """One of the clone's boot files, checked as cocoon's ``VerifyBaseFiles`` will check it."""
    match = BOOT_PATH.fullmatch(path or "")
    if match is None or match.group("root") != node.root_dir.rstrip("/"):
        raise PlanError(
            f"VM {vm}: the snapshot boots {what} {path!r}, which is not a boot file under {node.root_dir}/oci/boot",
            hint="cocoon would refuse the clone (verify base files); re-bake the snapshot on a node with this root dir",
        )
    hex_ = match.group("hex")
    present = None if state is None else f"{hex_}/{match.group('file')}" in state.boot_files
    if present is False and provider != f"sha256:{hex_}":
        raise PlanError(
            f"VM {vm}: {what} {path} is not on node and no layer of the snapshot's base image provides it",
            detail=f"the base image's {what} is in layer {provider or '(none)'}",
            hint="cocoon would refuse the clone (verify base files: base layer); pull the image the "
            "snapshot was baked from onto the node, or re-bake the snapshot",
        )
    return PlannedBootFile(path=match.group(0), layer=f"sha256:{hex_}", present=present)


def imported(snapshot: ResolvedSnapshot, hexes: Sequence[str], local: ObservedSnapshot | None) -> bool:
    """Whether the node already holds this snapshot as cocoonplan imports it: under the name
    derived from its digest, completely written, pinning the layers the plan clones. Its files
    are then not fetched again; apply still checks its ``cocoon.json`` before it clones."""
    return (
        local is not None
        and local.name == snapshot_import_name(snapshot.pinned.digest)
        and not local.pending
        and set(hexes) <= set(local.image_blob_ids)
    )


def _clone_blobs(
    snapshot: ResolvedSnapshot, hexes: Sequence[str], present: frozenset[str], on_node: bool
) -> tuple[PlannedBlob, ...]:
    """The base image's layers the clone runs on, then every file of the snapshot artifact
    (present when the node holds the snapshot already, ``on_node``)."""
    assert snapshot.base_image is not None  # check_snapshot_layers refuses a snapshot without one
    by_digest = {layer.digest: layer for layer in snapshot.base_image.layers}
    layers = layer_blobs((by_digest[f"sha256:{h}"] for h in hexes), present)
    files = [
        PlannedBlob(
            digest=f.digest,
            size=f.size,
            media_type=f.media_type,
            source=f.source,
            present=on_node,
            kind=BlobKind.SNAPSHOT_FILE if f.title else BlobKind.SNAPSHOT_CONFIG,
            title=f.title,
        )
        for f in (snapshot.config_blob, *snapshot.files)
    ]
    return (*layers, *files)


def plan_clone(loaded: LoadedSpec, resolved: ResolvedVM, target: Target, identity: Identity) -> DesiredVM:
    """The VM a clone of the resolved snapshot gives; raises LayerMismatchError when its layer
    records disagree, PlanError when cocoon would refuse the clone on this node."""
    node, state, rules = target.node, target.state, target.rules
    spec = loaded.spec
    body = spec.spec
    snapshot = resolved.snapshot
    assert snapshot is not None
    checked = (snapshot.pinned.digest, resolved.expected_base, node.root_dir)
    if checked not in target.memo.layers:  # a failed check is raised again for every VM
        hexes = check_snapshot_layers(snapshot, resolved.expected_base, node.root_dir, spec.name)
        _check_files(snapshot, spec.name)
        target.memo.layers[checked] = hexes
    hexes = target.memo.layers[checked]
    recorded = snapshot.config
    local = local_snapshot(snapshot, state)
    run_dir = vm_run_dir(node.effective_run_dir, identity.vm_id)
    sources = snapshot.meta.storage_configs
    disks = [config.model_copy(update={"path": _clone_path(config, run_dir)}) for config in sources]
    # cocoon v0.3.8 inherits queue sizes and direct I/O from the snapshot record unless a
    # clone flag overrides them; a record imported from a registry carries none (§7.4).
    no_direct_io = body.no_direct_io if body.no_direct_io is not None else bool(local and local.no_direct_io)
    tuning = Tuning(
        cpu=clone_value(spec.name, "cpu", body.cpu, recorded.cpu, rules),
        memory=clone_value(spec.name, "memory", body.memory, recorded.memory, rules),
        host_cpus=node.cpus,
        queue_size=body.queue_size or (local and local.queue_size) or DEFAULT_QUEUE_SIZE,
        disk_queue_size=body.disk_queue_size or (local and local.disk_queue_size) or DEFAULT_QUEUE_SIZE,
        no_direct_io=no_direct_io,
        hugepages=node.hugepages and rules.hugepages_from_host,
        windows=recorded.windows,
        rules=rules,
    )
    choice = restore_mode(spec.name, body.restore_mode, snapshot, target)
    mode = choice.mode
    check_host_cpus(spec.name, tuning.cpu, node.cpus)
    base = snapshot.base_image
    assert base is not None  # check_snapshot_layers refuses a snapshot without one
    payload = snapshot.ch_config.get("payload") or {}
    scanned = resolved.base_boot
    kernel_layer = scanned.kernel_layer if scanned else None
    initrd_layer = scanned.initrd_layer if scanned else None
    boot_files = (
        _boot_file(spec.name, payload.get("kernel"), "kernel", node, state, kernel_layer),
        _boot_file(spec.name, payload.get("initramfs"), "initrd", node, state, initrd_layer),
    )
    on_node = imported(snapshot, hexes, local)
    fetched = (snapshot.pinned.digest, resolved.present_blobs, on_node)
    if fetched not in target.memo.blobs:
        target.memo.blobs[fetched] = _clone_blobs(snapshot, hexes, resolved.present_blobs, on_node)
    blobs = target.memo.blobs[fetched]
    digests = [
        f"sha256:{hexes[i]}" if d.role is DiskRole.LAYER else _file_digest(snapshot, d)
        for i, d in enumerate(sources)
    ]
    return DesiredVM(
        name=spec.name,
        node=body.node,
        mode=Mode.CLONE,
        spec_file=loaded.file,
        vm_id=identity.vm_id,
        state=body.state,
        source=snapshot.pinned,
        base_image=PinnedRef(ref=recorded.image or base.repository, digest=base.pinned.digest),
        cpu=tuning.cpu,
        memory=tuning.memory,
        storage=clone_value(spec.name, "storage", body.storage, recorded.storage, rules),
        nics=len(identity.nics),
        network=body.network or recorded.network or target.default_network or "",
        interfaces=planned_nics(identity.nics, tuning),
        blobs=blobs,
        disks=planned_disks(disks, digests),
        boot_files=boot_files,
        local_snapshot=LocalSnapshot(id=local.id, name=local.name) if local else None,
        config=patch_clone_config(snapshot.ch_config, disks, tuning, run_dir=run_dir, vm_id=identity.vm_id),
        config_origin=ConfigOrigin.WRITTEN,
        cmdline=build_cmdline(len(hexes), spec.name, identity.nics, node.dns),
        launch=restore_launch_command(f"{run_dir}/api.sock"),
        restore=restore_requests(run_dir, snapshot.ch_config, identity.nics, tuning, mode),
        restore_mode=mode,
        notes=_clone_notes(choice, rules),
        warnings=(choice.warning,) if choice.warning else (),
    )


def _clone_notes(choice: RestoreChoice, rules: Rules) -> tuple[str, ...]:
    if rules.restore_taps:
        # cocoon PR #234: a Cloud Hypervisor clone gets a new interface, not the source's.
        notes = [
            "the resumed guest wakes on a new network interface with a fresh MAC and no IPv4 "
            "address: it must configure the network again (cocoon v0.6); the cmdline is the one "
            "recorded for its next cold boot"
        ]
    else:
        notes = [
            "the cmdline is the one cocoon records for the clone's next cold boot: the resumed guest "
            "keeps the source VM's kernel command line, hostname and address until it reboots"
        ]
    if choice.note:
        notes.append(choice.note)
    if choice.mode is not RestoreMode.COPY:
        notes.append(
            f"restoreMode {choice.mode} sends memory_restore_mode, which Cloud Hypervisor v51's published "
            "API schema does not define: the node's Cloud Hypervisor must accept it"
        )
    return tuple(notes)
