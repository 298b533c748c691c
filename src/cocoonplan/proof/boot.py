"""One proof run: every target booted in turn, in a private temporary directory.

Everything a run makes (the ``vmlinux``, the initramfs, fetched blobs, converted layers, the
scratch disks, the consoles) lies in one temporary directory, removed when the run ends,
however it ends; node files opened for a boot are closed with it, and each QEMU is gone before
its boot returns (:func:`cocoonplan.proof.qemu.boot`). Boots run one at a time: TCG keeps a
CPU busy, and a boot that must share it could miss its bound.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from cocoonplan.errors import ProofError
from cocoonplan.executors.blobs import BlobProgress, BlobRequest, BlobSources
from cocoonplan.proof.disks import DiskImage, LayerKey, disks_of, layer_images
from cocoonplan.proof.host import Machine
from cocoonplan.proof.initramfs import request_archive
from cocoonplan.proof.kernel import Guest, prepare_guest
from cocoonplan.proof.qemu import boot
from cocoonplan.proof.target import BootTarget
from cocoonplan.proof.verdict import Verification, judge


def prove(
    targets: Sequence[BootTarget],
    *,
    kernel_root: Path,
    machine: Machine,
    timeout: float,
    local_roots: Mapping[str, Path],
    blobs: Mapping[str, BlobRequest],
    sources: BlobSources,
    progress: BlobProgress,
    inventory: bool = False,
) -> tuple[Verification, ...]:
    """Boot every target (layers from ``local_roots``, the nodes' root directories readable
    here, else converted from ``blobs`` fetched through ``sources``) and judge each; with
    ``inventory`` each guest also lists every file of its root."""
    try:
        with tempfile.TemporaryDirectory(prefix="cocoonplan-boot-") as scratch, ExitStack() as stack:
            work = Path(scratch)
            layers = layer_images(
                targets,
                local_roots=local_roots,
                blobs=blobs,
                sources=sources,
                progress=progress,
                work=work,
                stack=stack,
            )
            (work / "guest").mkdir()
            guest = prepare_guest(kernel_root, work / "guest")
            return tuple(
                prove_one(target, guest, layers, machine, timeout, work, inventory=inventory)
                for target in targets
            )
    except OSError as exc:
        # The kernel root is read and the temporary directory written; nothing else is touched.
        raise ProofError(
            f"the boot proof could not use {exc.filename or 'its files'}: {exc.strerror or exc}",
            hint="check the kernel root, and the space and permissions of the temporary directory (TMPDIR)",
        ) from exc


def prove_one(
    target: BootTarget,
    guest: Guest,
    layers: Mapping[LayerKey, DiskImage],
    machine: Machine,
    timeout: float,
    work: Path,
    *,
    inventory: bool = False,
) -> Verification:
    """Boot ``target`` once, its scratch files in a directory of ``work`` removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vm-", dir=work) as scratch:
        directory = Path(scratch)
        disks = disks_of(target, layers, directory)
        initramfs = directory / "initramfs.cpio"
        with initramfs.open("wb") as out, guest.base.open("rb") as base:
            while chunk := base.read(1 << 20):
                out.write(chunk)
            out.write(request_archive(target.probes(), inventory))
        report = boot(guest, initramfs, disks, target.kernel_args, machine, timeout, directory)
    return judge(target, report, machine, timeout)
