"""The guest's serial console, read as markers (see :mod:`.initramfs` for what prints them).

A line starting ``COCOON-`` that does not parse is an error, never skipped: a garbled line
must not quietly drop an answer or a file from the comparison.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field

from cocoonplan.model import Model


class PathKind(StrEnum):
    """What the guest found at a path of its root (links followed); values are its words."""

    FILE = "file"
    DIRECTORY = "dir"
    OTHER = "other"
    """A device, FIFO or socket."""
    DANGLING = "dangling"
    """A symbolic link to nothing."""
    MISSING = "missing"


class Observation(Model):
    """The guest's answer for one probe (:class:`cocoonplan.proof.target.Probe`)."""

    index: int
    kind: PathKind
    mode: str | None
    """Permission bits in octal, as ``stat -c %a`` prints them; None when nothing is there."""
    sha256: str | None
    """Of a regular file the probe asked to hash; None otherwise."""
    path: str


class BootReport(Model):
    """What one boot printed on its console, parsed."""

    log: str
    seconds: float
    timed_out: bool = False
    init_started: bool = False
    done: bool = False
    errors: tuple[str, ...] = ()
    disks: dict[str, tuple[str, bool]] = Field(default_factory=dict)
    """serial -> (guest block device, read-only), for every virtio disk the guest saw."""
    overlay: str = ""
    """The overlay's options as /proc/mounts shows them."""
    observations: tuple[Observation, ...] = ()
    files: dict[str, str] = Field(default_factory=dict)
    """With an inventory: every regular file of the root (no leading ``./``) -> sha256 hex."""

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the console, for a failure report."""
        return "\n".join(self.log.rstrip("\n").splitlines()[-lines:])


_MARKER = re.compile(r"COCOON-[A-Z]+: .*")
_FILE = re.compile(r"COCOON-FILE: ([0-9a-f]{64})  \./(.+)")
_DISK = re.compile(r"COCOON-DISK: (\S+) (vd[a-z]+) ro=([01])")
_EXPECT = re.compile(
    rf"COCOON-EXPECT: (\d+) ({'|'.join(PathKind)}) ([0-7]{{1,4}}|-) ([0-9a-f]{{64}}|-) (/.*)"
)


def parse_console(log: str, *, seconds: float, timed_out: bool = False) -> BootReport:
    """The markers of one boot's console ``log``."""
    init_started = done = False
    overlay = ""
    errors: list[str] = []
    disks: dict[str, tuple[str, bool]] = {}
    files: dict[str, str] = {}
    observations: list[Observation] = []
    for raw in log.splitlines():
        line = raw.rstrip("\r")
        if not _MARKER.fullmatch(line) or line.startswith("COCOON-DMESG: "):
            continue
        if match := _FILE.fullmatch(line):
            files[match[2]] = match[1]
        elif match := _EXPECT.fullmatch(line):
            observations.append(
                Observation(
                    index=int(match[1]),
                    kind=PathKind(match[2]),
                    mode=None if match[3] == "-" else match[3],
                    sha256=None if match[4] == "-" else match[4],
                    path=match[5],
                )
            )
        elif match := _DISK.fullmatch(line):
            disks[match[1]] = (match[2], match[3] == "1")
        elif line.startswith("COCOON-OVERLAY: "):
            overlay = line.removeprefix("COCOON-OVERLAY: ")
        elif line.startswith("COCOON-ERROR: "):
            errors.append(line.removeprefix("COCOON-ERROR: "))
        elif line == "COCOON-MARKER: init":
            init_started = True
        elif line == "COCOON-MARKER: done":
            done = True
        else:
            errors.append(f"garbled console line: {line!r}")
    return BootReport(
        log=log,
        seconds=seconds,
        timed_out=timed_out,
        init_started=init_started,
        done=done,
        errors=tuple(errors),
        disks=disks,
        overlay=overlay,
        observations=tuple(observations),
        files=files,
    )
