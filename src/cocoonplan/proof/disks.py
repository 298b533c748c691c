"""The disk images of a boot: every layer as an EROFS file, a scratch cow, blank data disks.

A layer is booted from the node's own ``<root>/oci/blobs/<hex>.erofs`` when the node's root
directory is readable here: opened without following links (everything under a node root is
hostile input) and attached read-only through its descriptor, so the file the node's VMs boot
is the file the proof boots. Otherwise it is converted from its verified layer blob exactly as
apply converts it (:func:`cocoonplan.executors.layers.convert_layers`), the blob fetched
through the project's content sources. The cow is a fresh ext4 (what a new cocoon VM's
``cow.raw`` holds) and data disks are blank: the proof reads the image's files, never a VM's
writable state.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from cocoonplan.atomic import open_regular
from cocoonplan.cocoon import DiskRole
from cocoonplan.errors import ProofError
from cocoonplan.executors.blobs import BlobProgress, BlobRequest, BlobSources, fetch_blobs
from cocoonplan.executors.layers import LayerBlob, convert_layers
from cocoonplan.model import Model, digest_hex
from cocoonplan.proof.host import which
from cocoonplan.proof.target import BootTarget
from cocoonplan.resolvers.node import BLOBS_DIR
from cocoonplan.units import MIB

SCRATCH_COW_BYTES = 64 * MIB
"""Sparse: the guest writes a few blocks (the overlay's work directory and one marker file)."""
SCRATCH_DATA_BYTES = 1 * MIB
MKFS_TIMEOUT_SECONDS = 60.0

LayerKey = tuple[str, str]
"""(node, layer digest): a node's layer file is that node's, whatever another node holds."""


class DiskImage(Model):
    """A file QEMU attaches: by path, or by a descriptor this process opened (``fd``)."""

    path: str
    fd: int | None = None
    """Passed to QEMU, which opens ``/dev/fd/<fd>``: the file, not whatever its name points at."""


class Disk(Model):
    """One virtio-blk device of a boot."""

    serial: str
    readonly: bool
    image: DiskImage


def layer_images(
    targets: Sequence[BootTarget],
    *,
    local_roots: Mapping[str, Path],
    blobs: Mapping[str, BlobRequest],
    sources: BlobSources,
    progress: BlobProgress,
    work: Path,
    stack: ExitStack,
) -> dict[LayerKey, DiskImage]:
    """An EROFS image of every layer of ``targets``: the node's own file where its root
    directory (``local_roots``) has one, else converted from the blob ``blobs`` names, fetched
    into ``work``. Files opened here are closed by ``stack``."""
    images: dict[LayerKey, DiskImage] = {}
    wanted: dict[str, list[LayerKey]] = {}
    for target in targets:
        root = local_roots.get(target.node)
        for disk in target.disks:
            key = (target.node, disk.layer or "")
            if disk.layer is None or key in images or key in wanted.get(disk.layer, []):
                continue
            found = _node_layer(root, disk.layer, stack) if root is not None else None
            if found is not None:
                images[key] = found
            elif disk.layer in blobs:
                wanted.setdefault(disk.layer, []).append(key)
            else:
                where = (
                    f"no {_layer_file(disk.layer)} under {root}"
                    if root
                    else "no root directory readable here"
                )
                raise ProofError(
                    f"VM {target.label}: layer disk {disk.serial} ({disk.layer}) cannot be booted: "
                    f"node {target.node} has {where}, and no registry source is known for the layer",
                    hint=f"give the node's cocoon root directory (--root {target.node}=DIR)",
                )
    if wanted:
        fetched = fetch_blobs(
            [blobs[digest] for digest in wanted], sources, work / "blobs", progress=progress
        )
        converted = convert_layers(
            [LayerBlob(digest=b.digest, path=b.path) for b in fetched], work / "layers"
        )
        for layer in converted:
            for key in wanted[layer.digest]:
                images[key] = DiskImage(path=str(layer.erofs))
    return images


def _layer_file(digest: str) -> str:
    return f"{BLOBS_DIR}/{digest_hex(digest)}.erofs"


def _node_layer(root: Path, digest: str, stack: ExitStack) -> DiskImage | None:
    file = open_regular(root, _layer_file(digest))
    if file is None:
        return None
    stack.enter_context(file)
    return DiskImage(path=f"/dev/fd/{file.fileno()}", fd=file.fileno())


def disks_of(target: BootTarget, layers: Mapping[LayerKey, DiskImage], work: Path) -> list[Disk]:
    """The disks of ``target`` in its order: its layers' images, a fresh ext4 for the cow, blank
    files for the rest; scratch files go into ``work``."""
    disks = []
    for number, disk in enumerate(target.disks):
        if disk.layer is not None:
            image = layers[(target.node, disk.layer)]
        elif disk.role is DiskRole.COW:
            image = DiskImage(path=str(scratch_ext4(work / f"disk{number}.ext4", SCRATCH_COW_BYTES)))
        else:
            image = DiskImage(path=str(blank(work / f"disk{number}.raw", SCRATCH_DATA_BYTES)))
        disks.append(Disk(serial=disk.serial, readonly=disk.readonly, image=image))
    return disks


def blank(path: Path, size: int) -> Path:
    """A sparse file of ``size`` zero bytes (a disk the guest leaves alone)."""
    with path.open("xb") as out:
        out.truncate(size)
    return path


def scratch_ext4(path: Path, size: int) -> Path:
    """An empty ext4 file system in a sparse file of ``size`` bytes."""
    blank(path, size)
    mkfs = which("mkfs.ext4")
    if mkfs is None:
        raise ProofError(
            "cannot make the scratch cow disk: mkfs.ext4 is not installed", hint="install e2fsprogs"
        )
    try:
        done = subprocess.run(
            [mkfs, "-F", "-q", str(path)], capture_output=True, check=False, timeout=MKFS_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired as exc:
        raise ProofError(
            f"mkfs.ext4 did not finish within {MKFS_TIMEOUT_SECONDS:g} s on {path}",
            hint="check the temporary directory's file system (TMPDIR)",
        ) from exc
    if done.returncode != 0:
        raise ProofError(
            f"mkfs.ext4 failed on {path} (exit {done.returncode})",
            detail=done.stderr.decode(errors="replace").strip()[-2000:],
            hint="check the space in the temporary directory (TMPDIR)",
        )
    return path
