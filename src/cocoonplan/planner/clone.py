"""Clone planning: a hot snapshot cloned as ``cocoon vm clone`` does it (§8).

The disk list is the snapshot's own ``cocoon.json``, in order; layers keep their paths
verbatim, only the COW, data and cidata disks move into the clone's run directory, and the
snapshot's ``config.json`` is patched exactly where cocoon patches it.
"""

from __future__ import annotations

from cocoonplan.cocoon import DEFAULT_QUEUE_SIZE, DiskRole, StorageConfig, vm_run_dir
from cocoonplan.errors import PlanError
from cocoonplan.planner.hypervisor import Tuning, build_cmdline, clone_launch_command, patch_clone_config
from cocoonplan.planner.layers import check_snapshot_layers
from cocoonplan.planner.model import Action, BlobKind, Mode, PlannedBlob, PlannedDisk, VMPlan
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import BlobRef, PinnedRef, ResolvedSnapshot
from cocoonplan.spec import LoadedSpec


def _at_least(vm: str, field: str, wanted: int | None, snapshot_value: int) -> int:
    # cocoon v0.3.8 refuses clone values below the snapshot's: the guest already runs with them.
    if wanted is None:
        return snapshot_value
    if wanted < snapshot_value:
        raise PlanError(
            f"VM {vm}: {field} {wanted} is below the snapshot's {snapshot_value}",
            hint=f"a clone keeps at least the snapshot's {field}; raise it or leave it unset",
        )
    return wanted


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


def _layer_blobs(
    snapshot: ResolvedSnapshot, hexes: tuple[str, ...], present: frozenset[str]
) -> list[PlannedBlob]:
    assert snapshot.base_image is not None  # check_snapshot_layers refuses a snapshot without one
    by_digest: dict[str, BlobRef] = {layer.digest: layer for layer in snapshot.base_image.layers}
    return [
        PlannedBlob(
            digest=ref.digest,
            size=ref.size,
            media_type=ref.media_type,
            source=ref.source,
            present=hex_ in present,
            kind=BlobKind.LAYER,
        )
        for hex_ in hexes
        for ref in (by_digest[f"sha256:{hex_}"],)
    ]


def plan_clone(
    loaded: LoadedSpec,
    snapshot: ResolvedSnapshot,
    expected_base: PinnedRef | None,
    node: NodeConfig,
    vm_id: str,
    present: frozenset[str],
) -> VMPlan:
    """Plan a clone of ``snapshot``; raises LayerMismatchError when its layer records disagree."""
    spec = loaded.spec
    body = spec.spec
    hexes = check_snapshot_layers(snapshot, expected_base, node.root_dir, spec.name)
    recorded = snapshot.config
    cpu = _at_least(spec.name, "cpu", body.cpu, recorded.cpu)
    memory = _at_least(spec.name, "memory", body.memory, recorded.memory)
    storage = _at_least(spec.name, "storage", body.storage, recorded.storage)
    nics = _at_least(spec.name, "nics", body.nics, recorded.nics)
    run_dir = vm_run_dir(node.effective_run_dir, vm_id)
    disks = [
        config.model_copy(update={"path": _clone_path(config, run_dir)})
        for config in snapshot.meta.storage_configs
    ]
    tuning = Tuning(
        cpu=cpu,
        memory=memory,
        host_cpus=node.cpus,
        queue_size=body.queue_size or DEFAULT_QUEUE_SIZE,
        disk_queue_size=body.disk_queue_size or DEFAULT_QUEUE_SIZE,
        no_direct_io=body.no_direct_io,
        hugepages=node.hugepages,
        windows=recorded.windows,
    )
    blobs = _layer_blobs(snapshot, hexes, present)
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
    base = snapshot.base_image
    return VMPlan(
        name=spec.name,
        node=body.node,
        mode=Mode.CLONE,
        action=Action.CREATE,
        reason="no VM of this name runs on the node",
        spec_file=loaded.file,
        vm_id=vm_id,
        source=snapshot.pinned,
        base_image=PinnedRef(ref=recorded.image or base.repository, digest=base.pinned.digest)
        if base
        else None,
        cpu=cpu,
        memory=memory,
        storage=storage,
        nics=nics,
        blobs=tuple(blobs),
        fetch_bytes=sum(b.size for b in blobs if not b.present),
        disks=tuple(
            PlannedDisk(
                index=i,
                serial=d.serial,
                role=d.role,
                path=d.path,
                readonly=d.ro,
                digest=f"sha256:{hexes[i]}" if d.role is DiskRole.LAYER else _file_digest(snapshot, source),
            )
            for i, (d, source) in enumerate(zip(disks, snapshot.meta.storage_configs, strict=True))
        ),
        config=patch_clone_config(snapshot.ch_config, disks, tuning, f"{run_dir}/console.sock"),
        cmdline=build_cmdline(len(hexes), spec.name, nics),
        launch=clone_launch_command(f"{run_dir}/api.sock"),
    )
