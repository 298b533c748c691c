"""The VM executor: cocoon's own CLI, given exactly the planned flags.

cocoon owns its node (its databases, CNI, TAPs, the restore and NIC swap), so every change
of a VM goes through ``cocoon vm …`` with inputs that leave it no choice: the image by its
manifest digest, the snapshot by the name cocoonplan imported it under, every setting the
plan decided spelled out. The flags follow the node's cocoon line (reference §11 and
``cocoon-later.md`` §1): v0.3.8's ``vm clone`` takes ``--cpu/--memory/--storage`` and
``--on-demand``, the v0.6 line's takes neither but ``--restore-mode``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from cocoonplan.cocoon import DiskRole
from cocoonplan.errors import ApplyError
from cocoonplan.model import Mode
from cocoonplan.planner.model import PlannedDisk, VMPlan
from cocoonplan.planner.rules import Rules
from cocoonplan.releases import parse_version_output
from cocoonplan.spec import PowerState, RestoreMode

OUTPUT_LIMIT = 16 * 1024 * 1024
"""What a cocoon command may print (``-o json`` records are a few KiB)."""


@dataclass(frozen=True)
class CocoonCLI:
    """One node's cocoon binary with its global flags: every node setting that is one of
    cocoon's global flags (reference §11) is passed, so neither ``COCOON_*`` variables nor a
    config file on the node can make cocoon do other than what was planned."""

    command: tuple[str, ...]
    """The binary and any arguments before cocoon's own (from the node's ``cocoon`` setting)."""
    root_dir: str
    run_dir: str
    dns: tuple[str, ...]
    """The node's ``dns`` setting: the servers the planned cmdline's ``ip=`` parameters name."""
    env: Mapping[str, str]
    timeout: float = 600.0

    def global_flags(self) -> list[str]:
        """cocoon's global flags for this node. ``--dns=`` joined by commas (cocoon's list
        syntax); with ``=``, so that no servers is an empty setting rather than a missing value."""
        return ["--root-dir", self.root_dir, "--run-dir", self.run_dir, f"--dns={','.join(self.dns)}"]

    def run(self, args: Sequence[str], *, feed: Callable[[IO[bytes]], None] | None = None) -> str:
        """Run ``cocoon <global flags> <args>``; its standard output, or an ApplyError naming the
        command and cocoon's own last error line. ``feed`` writes the command's standard input."""
        argv = [*self.command, *self.global_flags(), *args]
        shown = shlex.join(["cocoon", *args])
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(self.env),
            )
        except OSError as exc:
            raise ApplyError(
                f"`{shown}` could not start: {exc}", hint="set the node's `cocoon` in cocoonplan.yaml"
            ) from exc
        # Output is drained while input streams in: a child that writes before it has read
        # all its input must never wait on a full pipe.
        collected: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=_drain, args=(stream, collected, key), daemon=True)
            for key, stream in (("out", process.stdout), ("err", process.stderr))
        ]
        for reader in readers:
            reader.start()
        try:
            if feed is not None and process.stdin is not None:
                with process.stdin:
                    feed(process.stdin)
            process.wait(timeout=self.timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError) as exc:
            process.kill()
            process.wait()
            raise ApplyError(
                f"`{shown}` did not finish: {exc}", hint="look at the node's cocoon logs"
            ) from exc
        finally:
            for reader in readers:
                reader.join()
        out, err = collected.get("out", b""), collected.get("err", b"")
        if process.returncode != 0:
            said = err.decode("utf-8", "replace").strip().splitlines()
            raise ApplyError(
                f"`{shown}` failed (exit {process.returncode}): {said[-1] if said else 'no message'}",
                hint="cocoon refused the planned change; nothing after this step was run",
            )
        return out[:OUTPUT_LIMIT].decode("utf-8", "replace")

    def version(self) -> str:
        """What ``cocoon version`` says on its ``Version:`` line."""
        try:
            return parse_version_output(self.run(["version"]))
        except ValueError as exc:
            raise ApplyError(f"`cocoon version`: {exc}", hint="check the node's `cocoon` setting") from exc

    def record(self, args: Sequence[str]) -> dict[str, Any]:
        """Run a command with ``-o json`` and return the VM record it prints."""
        text = self.run([*args, "-o", "json"])
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise ApplyError(f"`cocoon {args[0]} {args[1]}` printed no JSON record") from exc
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ApplyError(f"`cocoon {args[0]} {args[1]}` printed no VM record with an id")
        return record


def _drain(stream: IO[bytes] | None, into: dict[str, bytes], key: str) -> None:
    if stream is not None:
        with stream:
            into[key] = stream.read(OUTPUT_LIMIT)
            while stream.read(1 << 16):  # past the limit: keep the pipe moving, keep nothing
                pass


def _size(value: int) -> str:
    # go-units reads a bare number as bytes: no rounding to a unit.
    return str(value)


def _data_disk(disk: PlannedDisk) -> str:
    parts = [f"size={_size(disk.size or 0)}", f"name={disk.serial}", f"fstype={disk.fstype or 'ext4'}"]
    parts.append(f"mount={disk.mount_point or ''}")
    direct = {None: "auto", True: "on", False: "off"}[disk.direct_io]
    return ",".join([*parts, f"directio={direct}"])


def _common(vm: VMPlan) -> list[str]:
    args = ["--name", vm.name, "--nics", str(vm.nics)]
    queue = vm.interfaces[0].queue_size if vm.interfaces else None
    if queue:
        args += ["--queue-size", str(queue)]
    disk_queues = {d.get("queue_size") for d in vm.config.get("disks") or () if isinstance(d, dict)}
    if len(disk_queues) == 1 and (size := disk_queues.pop()):
        args += ["--disk-queue-size", str(size)]
    if vm.network:
        args += ["--network", vm.network]
    return args


def run_arguments(vm: VMPlan) -> list[str]:
    """``vm run`` (or ``vm create`` for a VM to be left stopped) of the planned image, by digest."""
    assert vm.mode is Mode.RUN and vm.source is not None
    verb = "run" if vm.state is PowerState.RUNNING else "create"
    args = ["vm", verb, *_common(vm), "--cpu", str(vm.cpu), "--memory", _size(vm.memory)]
    args += ["--storage", _size(vm.storage)]
    direct = {
        d.get("direct") for d in vm.config.get("disks") or () if isinstance(d, dict) and not d.get("readonly")
    }
    if direct == {False}:
        args.append("--no-direct-io")
    for disk in vm.disks:
        if disk.role is DiskRole.DATA:
            args += ["--data-disk", _data_disk(disk)]
    return [*args, vm.source.digest]


def clone_arguments(vm: VMPlan, snapshot: str, rules: Rules) -> list[str]:
    """``vm clone`` of the snapshot imported as ``snapshot``, with the flags of the node's line."""
    assert vm.mode is Mode.CLONE
    args = ["vm", "clone", *_common(vm)]
    if rules.clone_resizes:
        args += ["--cpu", str(vm.cpu), "--memory", _size(vm.memory), "--storage", _size(vm.storage)]
        if vm.restore_mode is RestoreMode.ONDEMAND:
            args.append("--on-demand")
    elif vm.restore_mode is not None:
        args += ["--restore-mode", vm.restore_mode.value]
    writable = [d for d in vm.config.get("disks") or () if isinstance(d, dict) and not d.get("readonly")]
    if writable and not any(d.get("direct") for d in writable):
        args.append("--no-direct-io")
    return [*args, snapshot]
