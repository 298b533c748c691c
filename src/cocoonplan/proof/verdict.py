"""A boot's console judged against the VM's expectations.

A VM is proven only when its guest finished (``COCOON-MARKER: done``, no ``COCOON-ERROR``,
within the bound) and answered for every expected path exactly once, and every answer is what
the spec expects. A boot that proves nothing (a panic, a hang, an error in ``/init``) is a
failure of its own, reported with the console's tail; its paths are not judged.
"""

from __future__ import annotations

from enum import StrEnum

from cocoonplan.model import Model
from cocoonplan.proof.console import BootReport, Observation, PathKind
from cocoonplan.proof.host import Machine
from cocoonplan.proof.target import BootTarget
from cocoonplan.spec import ExpectedFile


class Verdict(StrEnum):
    """What a boot showed about one expected path; values are the wire strings."""

    PRESENT = "present"
    """Expected, there, with the expected content and mode where the spec gives them."""
    ABSENT = "absent"
    """Expected absent, and nothing is there."""
    MISSING = "missing"
    DANGLING = "dangling link"
    NOT_A_FILE = "not a regular file"
    """The spec gives a sha256, and the path is a directory or a device."""
    CONTENT = "content differs"
    MODE = "mode differs"
    UNWANTED = "present, expected absent"


class Check(Model):
    """One expected path and what the boot showed."""

    path: str
    verdict: Verdict
    expected: str | None = None
    """The sha256 or mode expected, for ``content differs`` and ``mode differs``."""
    found: str | None = None
    """What is there instead: a sha256, a mode, or the kind of file."""

    @property
    def ok(self) -> bool:
        """Whether the path is as the spec expects."""
        return self.verdict in (Verdict.PRESENT, Verdict.ABSENT)

    def describe(self) -> str:
        """The check in words: the verdict, the path, what differs."""
        if self.verdict in (Verdict.CONTENT, Verdict.MODE):
            what = "sha256" if self.verdict is Verdict.CONTENT else "mode"
            return f"{self.verdict}: {self.path} ({what} {self.found}, expected {self.expected})"
        if self.found is not None:
            return f"{self.verdict}: {self.path} ({self.found})"
        return f"{self.verdict}: {self.path}"


class Verification(Model):
    """The proof of one VM: how it was booted, whether the boot finished, what it showed."""

    target: BootTarget
    machine: Machine
    report: BootReport
    failure: str | None = None
    """Why the boot proves nothing (panic, hang, timeout, an error in /init); None when it finished."""
    checks: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the boot finished and every expected path is as the spec expects."""
        return self.failure is None and all(check.ok for check in self.checks)

    @property
    def findings(self) -> tuple[Check, ...]:
        """The checks that failed."""
        return tuple(check for check in self.checks if not check.ok)


def judge(target: BootTarget, report: BootReport, machine: Machine, timeout: float) -> Verification:
    """The verification of ``target`` from its boot's ``report`` (bounded by ``timeout`` s)."""
    probes = target.probes()
    answers: dict[int, Observation] = {}
    garbled = []
    for observation in report.observations:
        asked = probes[observation.index] if observation.index < len(probes) else None
        if asked is None or asked.path != observation.path or observation.index in answers:
            garbled.append(observation.index)
        answers[observation.index] = observation
    failure = _failure(report, timeout)
    if failure is None and (garbled or len(answers) != len(probes)):
        failure = f"the guest answered for {len(answers)} of {len(probes)} expected paths" + (
            f", garbled for number(s) {', '.join(map(str, sorted(set(garbled))))}" if garbled else ""
        )
    if failure is not None:
        return Verification(target=target, machine=machine, report=report, failure=failure)
    checks = [_present(expected, answers[i]) for i, expected in enumerate(target.files)]
    checks += [_absent(path, answers[len(target.files) + i]) for i, path in enumerate(target.absent)]
    return Verification(target=target, machine=machine, report=report, checks=tuple(checks))


def _failure(report: BootReport, timeout: float) -> str | None:
    if report.timed_out:
        stage = "in /init" if report.init_started else "before /init started"
        return f"no power-off within {timeout:g} s, stuck {stage}"
    if report.errors:
        return "the guest failed: " + "; ".join(report.errors)
    if not report.done:
        panic = next((line.strip() for line in report.log.splitlines() if "Kernel panic" in line), None)
        if panic is not None:
            return f"the guest kernel panicked: {panic}"
        stage = "" if report.init_started else " (/init never started)"
        return f"the guest stopped before it finished{stage}"
    return None


def _octal(mode: str) -> str:
    return f"{int(mode, 8):04o}"


def _present(expected: ExpectedFile, seen: Observation) -> Check:
    path = expected.path
    if seen.kind is PathKind.MISSING:
        return Check(path=path, verdict=Verdict.MISSING)
    if seen.kind is PathKind.DANGLING:
        return Check(path=path, verdict=Verdict.DANGLING)
    if expected.sha256 is not None:
        if seen.kind is not PathKind.FILE:
            return Check(path=path, verdict=Verdict.NOT_A_FILE, found=seen.kind)
        if seen.sha256 != expected.sha256:
            return Check(path=path, verdict=Verdict.CONTENT, expected=expected.sha256, found=seen.sha256)
    if expected.mode is not None and seen.mode is not None and _octal(seen.mode) != _octal(expected.mode):
        return Check(path=path, verdict=Verdict.MODE, expected=_octal(expected.mode), found=_octal(seen.mode))
    return Check(path=path, verdict=Verdict.PRESENT)


def _absent(path: str, seen: Observation) -> Check:
    if seen.kind is PathKind.MISSING:
        return Check(path=path, verdict=Verdict.ABSENT)
    return Check(path=path, verdict=Verdict.UNWANTED, found=seen.kind)
