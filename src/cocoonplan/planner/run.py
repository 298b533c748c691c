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
from cocoonplan.planner.hypervisor import Boot, Tuning, build_cmdline, launch_command, run_config
from cocoonplan.planner.identity import Identity
from cocoonplan.planner.model import DesiredVM, Mode
from cocoonplan.planner.parts import check_host_cpus, layer_blobs, planned_disks
from cocoonplan.project import NodeConfig
from cocoonplan.resolved import ResolvedImage
from cocoonplan.spec import DataDisk, DirectIO, LoadedSpec
from cocoonplan.units import GIB

DEFAULT_CPU = 2
DEFAULT_MEMORY = GIB
DEFAULT_STORAGE = 10 * GIB
DEFAULT_NICS = 1


def run_nic_count(loaded: LoadedSpec) -> int:
    """NICs a run-mode VM gets: the spec's ``nics``, else cocoon's default of one."""
    nics = loaded.spec.spec.nics
    return DEFAULT_NICS if nics is None else nics


def _data_disk(disk: DataDisk, run_dir: str) -> StorageConfig:
    return StorageConfig(
        path=f"{run_dir}/data-{disk.name}.raw",
        ro=False,
        serial=disk.name,
        role=DiskRole.DATA,
        mount_point=disk.mount_point or None,
        fstype=disk.fstype.value,
        direct_io=None if disk.directio is DirectIO.AUTO else disk.directio is DirectIO.ON,
    )


def plan_run(
    loaded: LoadedSpec, image: ResolvedImage, node: NodeConfig, identity: Identity, present: frozenset[str]
) -> DesiredVM:
    """The VM a fresh run of ``image`` gives: its layers bottom first, then the COW and data disks."""
    spec = loaded.spec
    body = spec.spec
    if image.kernel_layer is None or image.initrd_layer is None:
        raise PlanError(
            f"VM {spec.name}: image {image.pinned.ref}@{image.pinned.digest} has no boot files",
            detail="no layer holds a regular file boot/vmlinuz* and boot/initrd.img* (cocoon: missing boot files)",
            hint="run mode needs an image with a kernel and an initrd under /boot",
        )
    run_dir = vm_run_dir(node.effective_run_dir, identity.vm_id)
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
    disks += [_data_disk(disk, run_dir) for disk in body.data_disks]
    tuning = Tuning(
        cpu=body.cpu or DEFAULT_CPU,
        memory=body.memory or DEFAULT_MEMORY,
        host_cpus=node.cpus,
        queue_size=body.queue_size or DEFAULT_QUEUE_SIZE,
        disk_queue_size=body.disk_queue_size or DEFAULT_QUEUE_SIZE,
        no_direct_io=body.no_direct_io,
        hugepages=node.hugepages,
    )
    check_host_cpus(spec.name, tuning.cpu, node.cpus)
    boot = Boot(
        kernel=boot_path(node.root_dir, digest_hex(image.kernel_layer), "vmlinuz"),
        initrd=boot_path(node.root_dir, digest_hex(image.initrd_layer), "initrd.img"),
        cmdline=build_cmdline(len(image.layers), spec.name, identity.nics, node.dns),
    )
    layer_digests: list[str | None] = [layer.digest for layer in image.layers]
    return DesiredVM(
        name=spec.name,
        node=body.node,
        mode=Mode.RUN,
        spec_file=loaded.file,
        vm_id=identity.vm_id,
        source=image.pinned,
        base_image=None,
        cpu=tuning.cpu,
        memory=tuning.memory,
        storage=body.storage or DEFAULT_STORAGE,
        nics=len(identity.nics),
        network=body.network or "",
        blobs=tuple(layer_blobs(image.layers, present)),
        disks=planned_disks(disks, layer_digests + [None] * (len(disks) - len(layer_digests))),
        config=run_config(disks=disks, nics=identity.nics, boot=boot, tuning=tuning),
        cmdline=boot.cmdline,
        launch=launch_command(
            api_socket=f"{run_dir}/api.sock", disks=disks, nics=identity.nics, boot=boot, tuning=tuning
        ),
    )
