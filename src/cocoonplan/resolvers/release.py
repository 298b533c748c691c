"""A node's cocoon release, learnt before anything is planned for it.

In order: the project's ``cocoonVersion``, then what ``cocoon version`` printed on the node
when its state was exported, then the layout of its root: SQLite metadata (``meta/meta.db``)
is the v0.6 line's; JSON metadata is v0.3.8's, unless a later release left its marks in it
(``.prev`` generations, per-VM locks), when only the node can say which release it runs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from cocoonplan.cocoon import MetadataEngine
from cocoonplan.errors import StateError
from cocoonplan.observed import NodeState
from cocoonplan.project import NodeConfig
from cocoonplan.releases import (
    SUPPORTED,
    CocoonLine,
    CocoonVersion,
    VersionSource,
    line_of,
    parse_version_output,
)

DETECTED_JSON = "v0.3.8"
DETECTED_SQLITE = "v0.6.x"


def node_release(name: str, settings: NodeConfig, state: NodeState | None) -> CocoonVersion | None:
    """The release node ``name`` runs; None when nothing says (its state is not known either).

    An exported version this cocoonplan does not plan for is a StateError naming it.
    """
    if settings.cocoon_version is not None:
        version = settings.cocoon_version
        return CocoonVersion(version=version, line=line_of(version), source=VersionSource.SETTING)
    if state is None:
        return None
    if state.cocoon_version is not None:
        try:
            line = line_of(state.cocoon_version)
        except ValueError as exc:
            raise StateError(
                f"node {name}: {exc}",
                hint=f"cocoonplan plans for {SUPPORTED}; upgrade the node, or plan it with the "
                "cocoonplan release that supports its cocoon",
            ) from exc
        return CocoonVersion(version=state.cocoon_version, line=line, source=VersionSource.EXPORTED)
    hint = f"set cocoonVersion for {name} in cocoonplan.yaml, or export its state with `--cocoon`"
    if state.metadata_engine is MetadataEngine.SQLITE:
        return CocoonVersion(version=DETECTED_SQLITE, line=CocoonLine.V0_6, source=VersionSource.DETECTED)
    if state.metadata_engine is None:
        raise StateError(f"node {name}: its root holds no cocoon metadata that shows its release", hint=hint)
    if state.later_layout:
        raise StateError(
            f"node {name}: a cocoon later than v0.3.8 wrote its JSON metadata, and the layout does not "
            "say which release",
            hint=hint,
        )
    return CocoonVersion(version=DETECTED_JSON, line=CocoonLine.V0_3, source=VersionSource.DETECTED)


VERSION_TIMEOUT = 10.0
"""Seconds ``cocoon version`` may take; it only prints build constants."""
VERSION_OUTPUT_LIMIT = 64 * 1024


def read_cocoon_version(binary: str, env: Mapping[str, str]) -> str:
    """What ``<binary> version`` prints on its ``Version:`` line; StateError when it cannot say."""
    hint = "pass the node's cocoon binary with --cocoon, or set cocoonVersion in cocoonplan.yaml"
    try:
        result = subprocess.run(
            [binary, "version"],
            capture_output=True,
            timeout=VERSION_TIMEOUT,
            env=dict(env),
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise StateError(f"`{binary} version` could not run: {exc}", hint=hint) from exc
    output = result.stdout[:VERSION_OUTPUT_LIMIT].decode("utf-8", "replace")
    if result.returncode != 0:
        raise StateError(f"`{binary} version` exited {result.returncode}", hint=hint)
    try:
        return parse_version_output(output)
    except ValueError as exc:
        raise StateError(f"`{binary} version`: {exc}", hint=hint) from exc
