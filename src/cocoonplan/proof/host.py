"""What this machine offers a boot proof: the programs, a static busybox, and whether KVM can
boot a stock kernel here (else QEMU's TCG emulates the guest)."""

from __future__ import annotations

import os
import re
import shutil
import struct
from enum import StrEnum
from pathlib import Path

from cocoonplan.errors import ProofError
from cocoonplan.model import Model

KERNEL_ROOT_VARIABLE = "COCOONPLAN_KERNEL_ROOT"
"""Where the kernel root is, when ``--kernel-root`` is not given."""
FETCH_HINT = "unpack Debian's linux-image with scripts/fetch-kernel and give the directory it prints"
BUSYBOX = Path("/bin/busybox")
"""Debian's busybox-static installs a static binary here."""
PROGRAMS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.erofs": "erofs-utils",
    "timeout": "coreutils",
}
"""The programs a proof runs, with the Debian package of each."""
KVM_DEVICE = Path("/dev/kvm")


class KvmMode(StrEnum):
    """``--kvm``: whether the guest runs under KVM; values are the option's words."""

    AUTO = "auto"
    """KVM where it can boot a stock kernel, else TCG."""
    ON = "on"
    """KVM, or fail saying why it cannot be used."""
    OFF = "off"
    """TCG: QEMU emulates the CPU (about 2-3 s per boot, and the same everywhere)."""


class Accelerator(StrEnum):
    """How QEMU runs the guest; values are QEMU's ``-accel`` names."""

    KVM = "kvm"
    TCG = "tcg"


class Machine(Model):
    """How this machine boots the guests of a proof run."""

    accelerator: Accelerator
    note: str = ""
    """Why TCG was chosen under ``--kvm auto``; empty otherwise."""
    tsc_khz: int | None = None
    """TCG: the host's TSC rate, which the guest then need not calibrate (see qemu.py)."""


def which(tool: str) -> str | None:
    """``tool`` on PATH or in the sbin directories, which a normal user's PATH often lacks."""
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def missing_prerequisites(kernel_root: Path | None, busybox: Path = BUSYBOX) -> list[str]:
    """What this machine lacks for a boot (empty: it can boot), each with how to get it."""
    missing = []
    if kernel_root is None:
        missing.append(f"a kernel root: --kernel-root DIR or {KERNEL_ROOT_VARIABLE} ({FETCH_HINT})")
    elif not (kernel_root / "lib" / "modules").is_dir():
        missing.append(f"a kernel under {kernel_root}, which has no lib/modules ({FETCH_HINT})")
    missing += [
        f"{tool} (apt-get install {package})" for tool, package in PROGRAMS.items() if not which(tool)
    ]
    if not _is_static(busybox):
        missing.append(f"a static {busybox} (apt-get install busybox-static)")
    return missing


def _is_static(path: Path) -> bool:
    """An ELF64 executable without a PT_INTERP segment runs in an initramfs with no libc."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def kvm_problem() -> str | None:
    """Why KVM cannot boot a stock kernel on this machine; None when it can.

    A ``/dev/kvm`` that opens is not enough: on PVM hosts (the out-of-tree ``kvm_pvm``, no
    ``vmx``/``svm``) a stock guest kernel crawls through an instruction emulator and dies on
    ``cmpxchg16b`` (recipes.md §8).
    """
    if not KVM_DEVICE.exists():
        return f"there is no {KVM_DEVICE}"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable for this user"
    if Path("/sys/module/kvm_pvm").exists():
        return f"{KVM_DEVICE} is PVM (kvm_pvm), which cannot run a stock kernel"
    flags = re.search(r"^flags\s*:(.*)$", _cpuinfo(), re.MULTILINE)
    if flags is None or not {"vmx", "svm"} & set(flags[1].split()):
        return "the CPU shows no vmx or svm flag (no hardware virtualisation)"
    return None


def host_tsc_khz() -> int | None:
    """The host CPU's rate in kHz from /proc/cpuinfo, if it has one (x86 hosts): the TSC rate
    on the CI machine kind (no cpufreq), the current clock, close to it, elsewhere."""
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", _cpuinfo(), re.MULTILINE)
    return round(float(match[1]) * 1000) if match else None


def choose_machine(mode: KvmMode) -> Machine:
    """The accelerator ``mode`` asks for on this machine; ``on`` where KVM cannot boot fails."""
    problem = None if mode is KvmMode.OFF else kvm_problem()
    if mode is KvmMode.ON and problem is not None:
        raise ProofError(
            f"--kvm on: KVM cannot boot the guest here: {problem}",
            hint="use --kvm auto (TCG where KVM cannot boot) or --kvm off",
        )
    if mode is not KvmMode.OFF and problem is None:
        return Machine(accelerator=Accelerator.KVM)
    return Machine(
        accelerator=Accelerator.TCG, note=f"KVM: {problem}" if problem else "", tsc_khz=host_tsc_khz()
    )
