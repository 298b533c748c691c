"""Which cocoon a node runs, and which line of planning rules that calls for.

cocoonplan knows two lines of cocoon exactly, from ``shared/reference``: v0.3.8
(``cocoon-formats.md``) and the v0.6.x line as of September 2026 (``cocoon-later.md``).
Releases between them changed the clone flags (v0.4.0), the restore modes and the TAP names
(July, about v0.5) piece by piece, and no changelog says which tag holds which change, so a
plan for them would be right in some places and silently wrong in others: they are refused,
as is anything older than v0.3.8 or newer than the v0.6 line.
"""

from __future__ import annotations

import re
from enum import StrEnum

from cocoonplan.model import Model


class CocoonLine(StrEnum):
    """A line of cocoon releases planned by one set of rules; values are the wire strings."""

    V0_3 = "v0.3"
    """v0.3.8 and its patch releases: JSON metadata, clones may grow CPU and memory."""
    V0_6 = "v0.6"
    """The v0.6.x line: SQLite metadata on fresh roots, restore modes, no resize at clone."""


class VersionSource(StrEnum):
    """Where a node's cocoon version was learnt; values are the wire strings."""

    SETTING = "setting"
    """``cocoonVersion`` in the project file."""
    EXPORTED = "exported"
    """``cocoon version`` on the node, recorded by ``state export``."""
    DETECTED = "detected"
    """The layout of the node's root."""


class CocoonVersion(Model):
    """A node's cocoon: the version as given, the rules it is planned by, and how it was learnt."""

    version: str
    line: CocoonLine
    source: VersionSource


_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:[-+][0-9A-Za-z.-]*)?$")
SUPPORTED = "v0.3.8 (and later v0.3 patches) and the v0.6.x line"


def line_of(version: str) -> CocoonLine:
    """The planning line of a cocoon version string (``v0.6.4``, ``0.3.8``, ``v0.6.7-3-gabc``).

    Raises ValueError naming the version and the supported lines.
    """
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        raise ValueError(
            f"cocoon version {version!r} is not a release version (a `go install` build says `unknown`)"
        )
    major, minor, patch = (int(part) for part in match.groups())
    if (major, minor) == (0, 3) and patch >= 8:
        return CocoonLine.V0_3
    if (major, minor) == (0, 6):
        return CocoonLine.V0_6
    raise ValueError(f"cocoon {version} is not supported: cocoonplan plans for {SUPPORTED}")


def parse_version_output(text: str) -> str:
    """The version from ``cocoon version``'s output, its ``Version:`` line (there is no JSON form)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Version" and value.strip():
            return value.strip()
    raise ValueError("`cocoon version` printed no `Version:` line")
