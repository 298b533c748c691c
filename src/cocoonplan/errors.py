"""Every failure cocoonplan reports, as one tree.

::

    CocoonplanError                  summary + detail + hint; the CLI prints these, exit 1
    ├── SpecError                    a VM spec, project or lock file is malformed (file:line:column)
    ├── ReferenceFormatError         an OCI reference does not parse
    ├── ResolveError                 a reference or blob could not be resolved
    │   ├── RegistryError            a registry or layout could not be read (network, HTTP, auth)
    │   ├── NotFoundError            a manifest, tag or blob does not exist at its source
    │   └── DigestMismatchError      bytes fetched do not hash to the digest that named them
    ├── LockError                    the lock file is missing an entry or out of date (--locked)
    ├── PlanError                    inputs resolved, but they cannot be planned
    │   ├── LayerMismatchError       a snapshot's layer set disagrees with its own records
    │   ├── FileExpectationError     a file the spec expects is missing from the planned layers (or differs)
    │   └── PlanFormatError          a saved plan file cannot be read
    ├── StateError                   a node's state cannot be read or is inconsistent
    ├── ApplyError                   apply could not carry out a step on a node (convert, record, …)
    └── ProofError                   a boot proof could not be run (kernel, tools, disk images, QEMU)

Each message says what failed, for which VM, reference, digest or file, and what to do next.
"""

from __future__ import annotations


class CocoonplanError(Exception):
    """Root of every error cocoonplan raises on purpose.

    ``summary`` is one line; ``detail`` may span lines (one per layer, say); ``hint`` says
    what the user should do next.
    """

    def __init__(self, summary: str, *, detail: str = "", hint: str = "") -> None:
        self.summary = summary
        self.detail = detail
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        """Return the full message: summary, then detail and hint on their own lines."""
        parts = [self.summary]
        if self.detail:
            parts.append(self.detail)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class SpecError(CocoonplanError):
    """A user-authored file (VM spec, project file, lock file) is not valid."""

    def __init__(
        self,
        summary: str,
        *,
        file: str,
        line: int | None = None,
        column: int | None = None,
        detail: str = "",
        hint: str = "",
    ) -> None:
        self.file = file
        self.line = line
        self.column = column
        where = file if line is None else f"{file}:{line}:{column or 1}"
        super().__init__(f"{where}: {summary}", detail=detail, hint=hint)


class ReferenceFormatError(CocoonplanError):
    """An OCI reference string does not parse."""


class ResolveError(CocoonplanError):
    """A reference, manifest or blob could not be resolved to verified bytes."""


class RegistryError(ResolveError):
    """A registry endpoint or layout could not be read (unreachable, HTTP error, auth)."""


class NotFoundError(ResolveError):
    """A manifest, tag or blob does not exist at the source that should hold it."""


class DigestMismatchError(ResolveError):
    """Fetched bytes do not hash to the digest (or size) that named them."""


class LockError(CocoonplanError):
    """The lock file is missing an entry or a tag moved since it was locked."""


class PlanError(CocoonplanError):
    """Resolved inputs cannot be turned into a plan."""


class LayerMismatchError(PlanError):
    """A snapshot's declared layers disagree with its config, config blob or base image."""


class FileExpectationError(PlanError):
    """A path ``expect.files`` names is missing from the VM's planned layers or differs there,
    or one ``expect.absent`` names is present."""


class PlanFormatError(PlanError):
    """A saved plan file is unreadable or of another format version."""


class StateError(CocoonplanError):
    """A node's state files cannot be read or contradict each other."""


class ApplyError(CocoonplanError):
    """A step of apply failed on the node: nothing under the step's final names was changed."""


class ProofError(CocoonplanError):
    """A boot proof could not be run: no kernel or tool, a disk image that cannot be made, QEMU
    that does not start. A guest that boots and lacks an expected file is a verdict, not this."""
