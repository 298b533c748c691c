"""Clone planning: a hot snapshot cloned as ``cocoon vm clone`` does it (§8).

The disk list is the snapshot's own ``cocoon.json``, in order; layers keep their paths
verbatim, only the COW, data and cidata disks move into the clone's run directory, and the
snapshot's ``config.json`` is patched exactly where cocoon patches it.
"""

from __future__ import annotations

from cocoonplan.cocoon import DEFAULT_QUEUE_SIZE, DiskRole, StorageConfig, vm_run_dir
from cocoonplan.errors import PlanError
from cocoonplan.planner.hypervisor import Tuning, build_cmdline, clone_launch_command, patch_clone_config
from cocoonplan.planner.identity import Identity
from cocoonplan.planner.layers import check_snapshot_layers
from cocoonplan.planner.model import BlobKind, DesiredVM, Mode, PlannedBlob
from cocoonplan.planner.parts import check_host_cpus, layer_blobs, planned_disks
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import PinnedRef, ResolvedSnapshot
from cocoonplan.spec import LoadedSpec


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


def plan_clone(
    loaded: LoadedSpec,
    snapshot: ResolvedSnapshot,
    expected_base: PinnedRef | None,
    node: NodeConfig,
    identity: Identity,
    present: frozenset[str],
) -> DesiredVM:
    """The VM a clone of ``snapshot`` gives; raises LayerMismatchError when its layer records disagree."""
    spec = loaded.spec
    body = spec.spec
    hexes = check_snapshot_layers(snapshot, expected_base, node.root_dir, spec.name)
    _check_files(snapshot, spec.name)
    recorded = snapshot.config
    run_dir = vm_run_dir(node.effective_run_dir, identity.vm_id)
    sources = snapshot.meta.storage_configs
    disks = [config.model_copy(update={"path": _clone_path(config, run_dir)}) for config in sources]
    tuning = Tuning(
        cpu=at_least(spec.name, "cpu", body.cpu, recorded.cpu),
        memory=at_least(spec.name, "memory", body.memory, recorded.memory),
        host_cpus=node.cpus,
        queue_size=body.queue_size or DEFAULT_QUEUE_SIZE,
        disk_queue_size=body.disk_queue_size or DEFAULT_QUEUE_SIZE,
        no_direct_io=body.no_direct_io,
        hugepages=node.hugepages,
        windows=recorded.windows,
    )
    check_host_cpus(spec.name, tuning.cpu, node.cpus)
    base = snapshot.base_image
    assert base is not None  # check_snapshot_layers refuses a snapshot without one
    by_digest = {layer.digest: layer for layer in base.layers}
    blobs = layer_blobs((by_digest[f"sha256:{h}"] for h in hexes), present)
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
        source=snapshot.pinned,
        base_image=PinnedRef(ref=recorded.image or base.repository, digest=base.pinned.digest),
        cpu=tuning.cpu,
        memory=tuning.memory,
        storage=at_least(spec.name, "storage", body.storage, recorded.storage),
        nics=len(identity.nics),
        network=body.network or recorded.network or "",
        blobs=tuple(blobs),
        disks=planned_disks(disks, digests),
        config=patch_clone_config(snapshot.ch_config, disks, tuning, f"{run_dir}/console.sock"),
        cmdline=build_cmdline(len(hexes), spec.name, identity.nics, node.dns),
        launch=clone_launch_command(f"{run_dir}/api.sock"),
    )
