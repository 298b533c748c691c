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
from cocoonplan.model import Mode, digest_hex
from cocoonplan.observed import NodeState
from cocoonplan.planner.hypervisor import Boot, Tuning, build_cmdline, launch_command, run_config
from cocoonplan.planner.identity import Identity
from cocoonplan.planner.model import ConfigOrigin, DesiredVM, PlannedBootFile, PlannedImageRecord
from cocoonplan.planner.parts import Target, check_host_cpus, layer_blobs, planned_disks, planned_nics
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


def image_record(image: ResolvedImage, state: NodeState | None) -> PlannedImageRecord:
    """The images.json entry ``cocoon vm run`` will look the image up by (§3.7: an exact key or
    the manifest digest): the node's own entry for this digest, else the digest reference a
    cocoon pull of it records."""
    assert image.kernel_layer is not None and image.initrd_layer is not None
    digest = image.pinned.digest
    existing = next((i for i in state.images if i.manifest_digest == digest), None) if state else None
    return PlannedImageRecord(
        key=existing.ref if existing else f"{image.repository}@{digest}",
        manifest_digest=digest,
        layers=tuple(layer.digest for layer in image.layers),
        kernel_layer=image.kernel_layer,
        initrd_layer=image.initrd_layer,
        present=None if state is None else existing is not None,
    )


def boot_file(root_dir: str, layer: str, file: str, state: NodeState | None) -> PlannedBootFile:
    """A boot file extracted from ``layer``, and whether the node has it already."""
    hex_ = digest_hex(layer)
    present = None if state is None else f"{hex_}/{file}" in state.boot_files
    return PlannedBootFile(path=boot_path(root_dir, hex_, file), layer=layer, present=present)


def plan_run(
    loaded: LoadedSpec, image: ResolvedImage, target: Target, identity: Identity, present: frozenset[str]
) -> DesiredVM:
    """The VM a fresh run of ``image`` gives: its layers bottom first, then the COW and data disks."""
    node, state = target.node, target.state
    spec = loaded.spec
    body = spec.spec
    if image.kernel_layer is None or image.initrd_layer is None:
        raise PlanError(
            f"VM {spec.name}: image {image.pinned.ref}@{image.pinned.digest} has no boot files",
            detail="no layer holds a regular file boot/vmlinuz* and boot/initrd.img* (cocoon: missing boot files)",
            hint="run mode needs an image with a kernel and an initrd under /boot",
        )
    run_dir = vm_run_dir(node.effective_run_dir, identity.vm_id)
    api_socket = f"{run_dir}/api.sock"
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
        no_direct_io=bool(body.no_direct_io),
        hugepages=node.hugepages and target.rules.hugepages_from_host,
        rules=target.rules,
    )
    check_host_cpus(spec.name, tuning.cpu, node.cpus)
    kernel = boot_file(node.root_dir, image.kernel_layer, "vmlinuz", state)
    initrd = boot_file(node.root_dir, image.initrd_layer, "initrd.img", state)
    boot = Boot(
        kernel=kernel.path,
        initrd=initrd.path,
        cmdline=build_cmdline(len(image.layers), spec.name, identity.nics, node.dns),
    )
    layer_digests: list[str | None] = [layer.digest for layer in image.layers]
    return DesiredVM(
        name=spec.name,
        node=body.node,
        mode=Mode.RUN,
        spec_file=loaded.file,
        vm_id=identity.vm_id,
        state=body.state,
        source=image.pinned,
        base_image=None,
        cpu=tuning.cpu,
        memory=tuning.memory,
        storage=body.storage or DEFAULT_STORAGE,
        nics=len(identity.nics),
        network=body.network or target.default_network or "",
        interfaces=planned_nics(identity.nics, tuning),
        blobs=tuple(layer_blobs(image.layers, present)),
        disks=planned_disks(
            disks,
            layer_digests + [None] * (len(disks) - len(layer_digests)),
            {disk.name: disk.size for disk in body.data_disks},
        ),
        boot_files=(kernel, initrd),
        image_record=image_record(image, state),
        config=run_config(api_socket=api_socket, disks=disks, nics=identity.nics, boot=boot, tuning=tuning),
        config_origin=ConfigOrigin.DERIVED,
        cmdline=boot.cmdline,
        launch=launch_command(
            api_socket=api_socket, disks=disks, nics=identity.nics, boot=boot, tuning=tuning
        ),
    )
