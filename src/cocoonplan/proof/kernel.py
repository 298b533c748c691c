"""The guest kernel: Debian's stock linux-image, unpacked without installing it.

``scripts/fetch-kernel`` unpacks the package with ``dpkg-deb -x``; the directory it prints (or
``/`` on a machine with the package installed) is the *kernel root*: ``boot/vmlinuz-V`` and
``lib/modules/V``. The guest boots the ``vmlinux`` inside the bzImage through its PVH entry, as
Cloud Hypervisor boots a cocoon VM, and loads the few modules the proof needs from the root.
"""

from __future__ import annotations

import lzma
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from cocoonplan.errors import ProofError
from cocoonplan.model import Model
from cocoonplan.proof.host import BUSYBOX, FETCH_HINT
from cocoonplan.proof.initramfs import base_archive

GUEST_MODULES = ("virtio_mmio", "virtio_blk", "crc32c_generic", "ext4", "erofs", "overlay")
"""The modules ``/init`` loads, dependencies resolved from each ``.ko``'s modinfo.
crc32c_generic is named because erofs and ext4 reach it only through libcrc32c's crypto lookup
of "crc32c" (a softdep on an alias, which modinfo's ``depends=`` does not list)."""


class Guest(Model):
    """What QEMU boots: an uncompressed PVH kernel and the shared part of the initramfs."""

    vmlinux: Path
    base: Path
    """The base archive (:func:`cocoonplan.proof.initramfs.base_archive`)."""


def prepare_guest(kernel_root: Path, work: Path, busybox: Path = BUSYBOX) -> Guest:
    """Extract ``vmlinux`` from the newest kernel under ``kernel_root`` and build the base
    initramfs, both into ``work``."""
    modules_root = kernel_root / "lib" / "modules"
    try:
        versions = [
            p.name for p in modules_root.iterdir() if (kernel_root / "boot" / f"vmlinuz-{p.name}").is_file()
        ]
    except OSError as exc:
        raise ProofError(f"cannot list {modules_root}: {exc.strerror or exc}", hint=FETCH_HINT) from exc
    if not versions:
        raise ProofError(
            f"no kernel under {kernel_root} has both boot/vmlinuz-VERSION and lib/modules/VERSION",
            hint=FETCH_HINT,
        )
    version = max(versions, key=lambda v: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", v)])
    vmlinux = extract_vmlinux(kernel_root / "boot" / f"vmlinuz-{version}", work / "vmlinux")
    modules = [
        (ko.name.removesuffix(".ko"), ko.read_bytes())
        for ko in module_load_order(modules_root / version, GUEST_MODULES)
    ]
    base = work / "base.cpio"
    base.write_bytes(base_archive(busybox.read_bytes(), modules))
    return Guest(vmlinux=vmlinux, base=base)


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """The ELF ``vmlinux`` inside a bzImage (Debian amd64 compresses it with xz).

    QEMU boots it through its PVH entry note, skipping the real-mode setup and the
    decompressor: 2.3x faster under TCG (recipes.md §7.2), and the way Cloud Hypervisor boots.
    """
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise ProofError(
            f"{bzimage}: no xz payload", hint="use a kernel built with CONFIG_KERNEL_XZ (Debian's amd64 is)"
        )
    try:
        elf = lzma.LZMADecompressor().decompress(data[start:])
    except lzma.LZMAError as exc:
        raise ProofError(f"{bzimage}: the xz payload does not decompress: {exc}", hint=FETCH_HINT) from exc
    if elf[:4] != b"\x7fELF":
        raise ProofError(f"{bzimage}: the xz payload is not an ELF image", hint=FETCH_HINT)
    out.write_bytes(elf)
    return out


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module: key -> values, in order."""
    data = ko.read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[names_at + name : data.index(b"\0", names_at + name)] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in data[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode().partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ProofError(f"{ko}: no .modinfo section", hint="the kernel root holds a broken module")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and their dependencies, dependencies first; modules the
    kernel has built in (modules.builtin) need no file and are left out.

    Computed from each module's ``depends=`` because the linux-image package ships no
    modules.dep (depmod writes it at install time, and the package is only unpacked).
    """

    def module_name(path: str) -> str:
        return Path(path).name.removesuffix(".ko").replace("-", "_")

    by_name = {module_name(ko.name): ko for ko in modules_dir.rglob("*.ko")}
    builtin_list = modules_dir / "modules.builtin"
    builtin = (
        {module_name(line) for line in builtin_list.read_text().split()} if builtin_list.is_file() else set()
    )
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin:
            return
        if name in chain:
            raise ProofError(f"module dependency cycle under {modules_dir}: {' -> '.join((*chain, name))}")
        ko = by_name.get(name)
        if ko is None:
            raise ProofError(
                f"module {name} is not under {modules_dir}",
                hint="the proof loads uncompressed .ko files (Debian 12's kernels ship them so)",
            )
        if ko in order:
            return
        for deps in modinfo(ko).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep.replace("-", "_"), (*chain, name))
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order
