"""Clone planning: a hot snapshot cloned as ``cocoon vm clone`` does it (§8).

The disk list is the snapshot's own ``cocoon.json``, in order; layers keep their paths
verbatim, only the COW, data and cidata disks move into the clone's run directory, and the
snapshot's ``config.json`` is patched exactly where cocoon patches it.
"""

from __future__ import annotations

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
from cocoonplan.planner.parts import check_host_cpus, layer_blobs, planned_disks, planned_nics
from cocoonplan.project import NodeConfig
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


def plan_clone(
    loaded: LoadedSpec,
    resolved: ResolvedVM,
    node: NodeConfig,
    identity: Identity,
    state: NodeState | None,
    default_network: str | None,
) -> DesiredVM:
    """The VM a clone of the resolved snapshot gives; raises LayerMismatchError when its layer
    records disagree, PlanError when cocoon would refuse the clone on this node."""
    spec = loaded.spec
    body = spec.spec
    snapshot = resolved.snapshot
    assert snapshot is not None
    hexes = check_snapshot_layers(snapshot, resolved.expected_base, node.root_dir, spec.name)
    _check_files(snapshot, spec.name)
    recorded = snapshot.config
    local = local_snapshot(snapshot, state)
    run_dir = vm_run_dir(node.effective_run_dir, identity.vm_id)
    sources = snapshot.meta.storage_configs
    disks = [config.model_copy(update={"path": _clone_path(config, run_dir)}) for config in sources]
    # cocoon v0.3.8 inherits queue sizes and direct I/O from the snapshot record unless a
    # clone flag overrides them; a record imported from a registry carries none (§7.4).
    no_direct_io = body.no_direct_io if body.no_direct_io is not None else bool(local and local.no_direct_io)
    tuning = Tuning(
        cpu=at_least(spec.name, "cpu", body.cpu, recorded.cpu),
        memory=at_least(spec.name, "memory", body.memory, recorded.memory),
        host_cpus=node.cpus,
        queue_size=body.queue_size or (local and local.queue_size) or DEFAULT_QUEUE_SIZE,
        disk_queue_size=body.disk_queue_size or (local and local.disk_queue_size) or DEFAULT_QUEUE_SIZE,
        no_direct_io=no_direct_io,
        hugepages=node.hugepages,
        windows=recorded.windows,
    )
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
    by_digest = {layer.digest: layer for layer in base.layers}
    blobs = layer_blobs((by_digest[f"sha256:{h}"] for h in hexes), resolved.present_blobs)
    blobs += [
        PlannedBlob(
            digest=f.digest,
            size=f.size,
            media_type=f.media_type,
            source=f.source,
            present=False,
            kind=BlobKind.SNAPSHOT_FILE,
            title=f.title,
        )
        for f in snapshot.files
    ]
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
        storage=at_least(spec.name, "storage", body.storage, recorded.storage),
        nics=len(identity.nics),
        network=body.network or recorded.network or default_network or "",
        interfaces=planned_nics(identity.nics, tuning),
        blobs=tuple(blobs),
        disks=planned_disks(disks, digests),
        boot_files=boot_files,
        local_snapshot=LocalSnapshot(id=local.id, name=local.name) if local else None,
        config=patch_clone_config(snapshot.ch_config, disks, tuning, f"{run_dir}/console.sock"),
        config_origin=ConfigOrigin.WRITTEN,
        cmdline=build_cmdline(len(hexes), spec.name, identity.nics, node.dns),
        launch=restore_launch_command(f"{run_dir}/api.sock"),
        restore=restore_requests(
            run_dir,
            snapshot.ch_config,
            identity.nics,
            tuning,
            on_demand=body.restore_mode is RestoreMode.ONDEMAND,
        ),
        notes=_clone_notes(body.restore_mode),
    )


def _clone_notes(mode: RestoreMode) -> tuple[str, ...]:
    notes = [
        "the cmdline is the one cocoon records for the clone's next cold boot: the resumed guest "
        "keeps the source VM's kernel command line, hostname and address until it reboots"
    ]
    if mode is RestoreMode.ONDEMAND:
        notes.append(
            "restoreMode ondemand sends memory_restore_mode, which Cloud Hypervisor v51's published "
            "API schema does not define: the node's Cloud Hypervisor must accept it"
        )
    return tuple(notes)
