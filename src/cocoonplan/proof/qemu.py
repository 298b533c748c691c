"""One guest boot under QEMU: the command line, and a run that is bounded in time and leaves
no process behind.

The machine is ``-machine microvm``: virtio-mmio disks and direct PVH kernel boot, the shape of
machine Cloud Hypervisor gives a cocoon VM. The serial console is QEMU's stdout, written to a
file; QEMU's exit status says nothing (with ``panic=-1 -no-reboot`` a guest that panics ends
QEMU with status 0, recipes.md §7.6), so :mod:`.console` judges the console alone.

QEMU runs in a session of its own under coreutils' ``timeout``. When the bound passes, when the
caller is interrupted (Ctrl-C) or anything else goes wrong, ``timeout`` is told to end it and
reaps it (a killed parent would leave QEMU to an init that may never reap it); should this
process itself be killed, ``timeout`` kills QEMU a little after the bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from cocoonplan.errors import ProofError
from cocoonplan.proof.console import BootReport, parse_console
from cocoonplan.proof.disks import Disk
from cocoonplan.proof.host import Accelerator, Machine, which
from cocoonplan.proof.kernel import Guest

QEMU = "qemu-system-x86_64"
MEMORY = "512M"
"""Allocated lazily by QEMU: the guest touches a few tens of MB."""
CONSOLE_LIMIT = 64 << 20
"""Console bytes read back; a guest that prints more is cut there (and fails for it)."""
ORPHAN_GRACE_SECONDS = 10
"""How long after the bound ``timeout`` kills QEMU itself, should this process be gone."""
STOP_GRACE_SECONDS = 5
"""How long QEMU may take to exit on SIGTERM before its process group is killed."""


def kernel_command_line(kernel_args: Sequence[str], machine: Machine) -> str:
    """The guest's command line: serial console, power off on panic, then ``kernel_args``.

    Under TCG the guest's TSC is the host's, and microvm has no HPET or ACPI PM timer to
    calibrate it against, only the PIT. On a busy host the PIT calibration fails ("Unable to
    calibrate against PIT"), the kernel marks the TSC unusable and then never sees a timer
    tick: the boot hangs silently (half of all boots with three running at once on two CPUs).
    ``tsc_early_khz`` with the host's rate skips that calibration. Where the host reports no
    rate the kernel calibrates as usual; a wrong rate would only skew guest time.
    """
    args = ["console=ttyS0", "panic=-1", "loglevel=3"]
    if machine.accelerator is Accelerator.TCG and machine.tsc_khz:
        args.append(f"tsc_early_khz={machine.tsc_khz}")
    return " ".join([*args, *kernel_args])


def qemu_command(
    vmlinux: Path, initramfs: Path, disks: Sequence[Disk], kernel_args: Sequence[str], machine: Machine
) -> list[str]:
    """The QEMU command line booting ``vmlinux`` with ``disks`` attached in their order."""
    accel = ["-accel", "kvm", "-cpu", "host"] if machine.accelerator is Accelerator.KVM else ["-accel", "tcg"]
    command = [
        QEMU,
        *accel,
        *("-machine", "microvm,rtc=on", "-m", MEMORY, "-smp", "1"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"),
        *("-kernel", str(vmlinux), "-initrd", str(initramfs)),
        *("-append", kernel_command_line(kernel_args, machine)),
    ]
    for i, disk in enumerate(disks):
        # A read-only disk takes no lock: it may be a node's layer file, which that node's VMMs
        # have open.
        drive = f"id=disk{i},if=none,format=raw,file={_value(disk.image.path)}"
        command += ["-drive", drive + (",readonly=on,file.locking=off" if disk.readonly else "")]
        command += ["-device", f"virtio-blk-device,drive=disk{i},serial={_value(disk.serial)}"]
    return command


def _value(text: str) -> str:
    """``text`` as one QEMU option value, which escapes a comma by doubling it: a serial from a
    node's record can add no option of its own."""
    return text.replace(",", ",,")


def boot(
    guest: Guest,
    initramfs: Path,
    disks: Sequence[Disk],
    kernel_args: Sequence[str],
    machine: Machine,
    timeout: float,
    work: Path,
) -> BootReport:
    """Boot ``guest`` with ``initramfs`` and ``disks`` for at most ``timeout`` seconds and
    parse its console (kept in ``work``)."""
    bound = which("timeout")
    if bound is None:
        raise ProofError("cannot bound the boot: timeout is not installed", hint="install coreutils")
    command = [
        bound,
        "--signal=KILL",
        f"{timeout + ORPHAN_GRACE_SECONDS:g}s",
        *qemu_command(guest.vmlinux, initramfs, disks, kernel_args, machine),
    ]
    console, stderr = work / "console.log", work / "qemu.stderr"
    started = time.monotonic()
    timed_out = False
    with console.open("wb") as out, stderr.open("wb") as err:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=[d.image.fd for d in disks if d.image.fd is not None],
                start_new_session=True,
            )
        except OSError as exc:
            raise ProofError(f"{QEMU} could not start: {exc}", hint="install qemu-system-x86") from exc
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if process.poll() is None:
                _stop(process)
    seconds = time.monotonic() - started
    log = _read(console, CONSOLE_LIMIT)
    problems = _read(stderr, 16 << 10).strip()
    if problems:
        separator = "\n" if log and not log.endswith("\n") else ""
        log += f"{separator}--- {QEMU} stderr ---\n{problems}\n"
    return parse_console(log, seconds=seconds, timed_out=timed_out)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a boot: SIGTERM to ``timeout``, which passes it to QEMU (which exits on it) and
    reaps it; the whole process group is killed should that take longer than a few seconds."""
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _read(path: Path, limit: int) -> str:
    with path.open("rb") as file:
        return file.read(limit).decode(errors="replace")
