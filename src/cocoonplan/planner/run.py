"""Run planning: an OCI image booted fresh, as ``cocoon vm run`` lays it out (§5)."""

from __future__ import annotations

from cocoonplan.cocoon import (
    COW_SERIAL,
    DEFAULT_QUEUE_SIZE,
    DiskRole,
    StorageConfig,
    blob_path,
    boot_path,
    layer_serial,
    vm_run_dir,
)
from cocoonplan.errors import PlanError
from cocoonplan.model import digest_hex
from cocoonplan.planner.hypervisor import Nic, Tuning, build_cmdline, launch_command, run_config
from cocoonplan.planner.identity import planned_mac, tap_name
from cocoonplan.planner.model import Action, BlobKind, Mode, PlannedBlob, PlannedDisk, VMPlan
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import ResolvedImage
from cocoonplan.spec import DirectIO, LoadedSpec
from cocoonplan.units import GIB

DEFAULT_CPU = 2
DEFAULT_MEMORY = GIB
DEFAULT_STORAGE = 10 * GIB
DEFAULT_NICS = 1


def plan_run(
    loaded: LoadedSpec, image: ResolvedImage, node: NodeConfig, vm_id: str, present: frozenset[str]
) -> VMPlan:
    """Plan a fresh run of ``image``: its layers bottom first, then the COW and data disks."""
    spec = loaded.spec
    body = spec.spec
    if image.kernel_layer is None or image.initrd_layer is None:
        raise PlanError(
            f"VM {spec.name}: image {image.pinned.ref}@{image.pinned.digest} has no boot files",
            detail="no layer holds a regular file boot/vmlinuz* and boot/initrd.img* (cocoon: missing boot files)",
            hint="run mode needs an image with a kernel and an initrd under /boot",
        )
    cpu = body.cpu or DEFAULT_CPU
    memory = body.memory or DEFAULT_MEMORY
    storage = body.storage or DEFAULT_STORAGE
    nic_count = DEFAULT_NICS if body.nics is None else body.nics
    run_dir = vm_run_dir(node.effective_run_dir, vm_id)
    disks = [
        StorageConfig(
            path=blob_path(node.root_dir, digest_hex(layer.digest)),
            ro=True,
            serial=layer_serial(j),
            role=DiskRole.LAYER,
        )
        for j, layer in enumerate(image.layers)
    ]
    disks.append(StorageConfig(path=f"{run_dir}/cow.raw", ro=False, serial=COW_SERIAL, role=DiskRole.COW))
    disks += [
        StorageConfig(
            path=f"{run_dir}/data-{disk.name}.raw",
            ro=False,
            serial=disk.name,
            role=DiskRole.DATA,
            mount_point=disk.mount_point or None,
            fstype=disk.fstype.value,
            direct_io=None if disk.directio is DirectIO.AUTO else disk.directio is DirectIO.ON,
        )
        for disk in body.data_disks
    ]
    nics = [Nic(tap=tap_name(vm_id, i), mac=planned_mac(vm_id, i)) for i in range(nic_count)]
    tuning = Tuning(
        cpu=cpu,
        memory=memory,
        host_cpus=node.cpus,
        queue_size=body.queue_size or DEFAULT_QUEUE_SIZE,
        disk_queue_size=body.disk_queue_size or DEFAULT_QUEUE_SIZE,
        no_direct_io=body.no_direct_io,
        hugepages=node.hugepages,
    )
    kernel = boot_path(node.root_dir, digest_hex(image.kernel_layer), "vmlinuz")
    initrd = boot_path(node.root_dir, digest_hex(image.initrd_layer), "initrd.img")
    cmdline = build_cmdline(len(image.layers), spec.name, nic_count)
    blobs = tuple(
        PlannedBlob(
            digest=layer.digest,
            size=layer.size,
            media_type=layer.media_type,
            source=layer.source,
            present=digest_hex(layer.digest) in present,
            kind=BlobKind.LAYER,
        )
        for layer in image.layers
    )
    return VMPlan(
        name=spec.name,
        node=body.node,
        mode=Mode.RUN,
        action=Action.CREATE,
        reason="no VM of this name runs on the node",
        spec_file=loaded.file,
        vm_id=vm_id,
        source=image.pinned,
        base_image=None,
        cpu=cpu,
        memory=memory,
        storage=storage,
        nics=nic_count,
        blobs=blobs,
        fetch_bytes=sum(b.size for b in blobs if not b.present),
        disks=tuple(
            PlannedDisk(
                index=i,
                serial=d.serial,
                role=d.role,
                path=d.path,
                readonly=d.ro,
                digest=image.layers[i].digest if d.role is DiskRole.LAYER else None,
            )
            for i, d in enumerate(disks)
        ),
        config=run_config(
            disks=disks, nics=nics, kernel=kernel, initrd=initrd, cmdline=cmdline, tuning=tuning
        ),
        cmdline=cmdline,
        launch=launch_command(
            api_socket=f"{run_dir}/api.sock",
            disks=disks,
            nics=nics,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            tuning=tuning,
        ),
    )
