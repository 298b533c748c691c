"""A node's cocoon release, learnt before anything is planned for it.

In order: the project's ``cocoonVersion``, then what ``cocoon version`` printed on the node
when its state was exported, then the layout of its root: SQLite metadata (``meta/meta.db``)
is the v0.6 line's; JSON metadata is v0.3.8's, unless a later release left its marks in it
(``.prev`` generations, per-VM locks), when only the node can say which release it runs.

A version that is given is still checked against the layout: v0.3.8 has no SQLite engine, so
a v0.3 version over a SQLite root is refused, whichever source gave it. A JSON root under a
v0.6 version is a legacy root, which that line reads as it is.
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
from cocoonplan.resolvers.metastore import META_DB

DETECTED_JSON = "v0.3.8"
DETECTED_SQLITE = "v0.6.x"


def node_release(name: str, settings: NodeConfig, state: NodeState | None) -> CocoonVersion | None:
    """The release node ``name`` runs; None when nothing says (its state is not known either).

    An exported version this cocoonplan does not plan for is a StateError naming it.
    """
    if settings.cocoon_version is not None:
        version = settings.cocoon_version
        given = CocoonVersion(version=version, line=line_of(version), source=VersionSource.SETTING)
        return _check_layout(name, given, state)
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
        exported = CocoonVersion(version=state.cocoon_version, line=line, source=VersionSource.EXPORTED)
        return _check_layout(name, exported, state)
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


def layout_contradiction(line: CocoonLine, state: NodeState | None) -> str | None:
    """What in the root's layout a release of ``line`` cannot have written; None when nothing.

    Only SQLite metadata is evidence against a version: v0.3.8 has no SQLite engine, and a
    v0.3 cocoon over such a root would see none of its VMs. A JSON root is v0.3.8's or a later
    release's legacy root, so it contradicts neither line.
    """
    if line is CocoonLine.V0_3 and state is not None and state.metadata_engine is MetadataEngine.SQLITE:
        return f"its root keeps its metadata in SQLite ({META_DB}), which no v0.3 release has"
    return None


def _check_layout(name: str, release: CocoonVersion, state: NodeState | None) -> CocoonVersion:
    evidence = layout_contradiction(release.line, state)
    if evidence is None:
        return release
    if release.source is VersionSource.SETTING:
        said = f"cocoonVersion says {release.version}"
        hint = (
            f"set cocoonVersion for {name} to what `cocoon version` prints on the node (a SQLite "
            "root is the v0.6 line's), or point its state at the node's own root"
        )
    else:
        said = f"its exported state says cocoon {release.version}"
        hint = (
            "export the state again with the node's own cocoon (`cocoonplan state export --cocoon "
            f"BINARY`), or set cocoonVersion for {name} in cocoonplan.yaml"
        )
    raise StateError(f"node {name}: {said}, but {evidence}", hint=hint)


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
