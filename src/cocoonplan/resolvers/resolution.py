"""The resolve stage: every input of a plan resolved, digest first, before anything is decided.

Nodes are read (where their state lives, what cocoon release and default network they
have), every spec's references are pinned through the lock and resolved to manifests,
snapshot files and boot layers, and each VM on a node is matched with the image its record
names. The result, :class:`Resolution`, is plain data: the pure planner makes a plan of it,
and apply's post-apply proof re-plans through the same stage.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

from cocoonplan.cocoon import BOOT_PATH
from cocoonplan.context import ProjectContext
from cocoonplan.errors import CocoonplanError, LockError, StateError
from cocoonplan.lock import LockFile
from cocoonplan.model import NAME_PATTERN, Model
from cocoonplan.observed import NodeState, ObservedVM
from cocoonplan.oci.reference import Reference, parse_reference
from cocoonplan.oci.sources import Sources
from cocoonplan.planner import PlanInput
from cocoonplan.planner.model import Diagnostic, LockChange
from cocoonplan.project import Arch, Project
from cocoonplan.releases import CocoonVersion
from cocoonplan.resolved import (
    NodeView,
    PinnedRef,
    ResolvedImage,
    ResolvedSnapshot,
    ResolvedVM,
    RunningBase,
)
from cocoonplan.resolvers.content import Content
from cocoonplan.resolvers.files import expects_files, gather_files
from cocoonplan.resolvers.image import resolve_image
from cocoonplan.resolvers.layerscan import LayerScanner
from cocoonplan.resolvers.network import default_networks
from cocoonplan.resolvers.node import present_layers, read_node_state
from cocoonplan.resolvers.pins import Pinner
from cocoonplan.resolvers.release import node_release
from cocoonplan.resolvers.snapshot import resolve_snapshot
from cocoonplan.spec import LoadedSpec

FETCHES_AT_ONCE = 8
"""Registry fetches a plan has in flight at once (tag lookups, snapshot resolutions): enough
to hide a WAN's latency behind one another, few enough for any registry's rate limits."""


class Resolution(Model):
    """Everything a plan is made from, resolved and pinned by digest."""

    inputs: tuple[PlanInput, ...]
    """Each spec that resolved, with what it resolved to and its node's settings."""
    nodes: dict[str, NodeView]
    lock_changes: tuple[LockChange, ...]
    errors: tuple[Diagnostic, ...]
    """Specs that failed to resolve (they are planned as errors, never deleted)."""
    warnings: tuple[Diagnostic, ...]


def node_locations(
    context: ProjectContext, cwd: Path, roots: Sequence[str], states: Sequence[str]
) -> dict[str, Path]:
    """Where ``--root`` (``[NODE=]DIR``) and ``--state`` (``[NODE=]FILE``) say nodes are read from."""
    overrides = state_overrides(roots, context, cwd, directories=True)
    from_files = state_overrides(states, context, cwd, directories=False)
    if both := sorted(overrides.keys() & from_files.keys()):
        raise CocoonplanError(f"--root and --state both name node {both[0]}", hint="give one per node")
    return overrides | from_files


def resolve(
    context: ProjectContext,
    specs: Sequence[LoadedSpec],
    states: Mapping[str, NodeState | None],
    sources: Sources,
    *,
    lock: LockFile,
    lock_display: str,
    locked: bool = False,
    update_lock: bool = False,
    refresh_only: bool = False,
    roots: Mapping[str, Path] | None = None,
) -> Resolution:
    """Resolve every spec against the node it targets (a refresh-only plan resolves none: it
    compares the nodes with their own records). A spec that fails becomes an error entry.

    ``roots`` are the nodes' cocoon root directories readable from here (:func:`root_directories`),
    whose EROFS layers file expectations may read."""
    networks = default_networks(context, states)
    releases = {name: node_release(name, context.project.nodes[name], states[name]) for name in states}
    content = Content(sources)
    pinner = Pinner(content, lock, lock_display, locked=locked, update=update_lock)
    expected = [spec.spec.spec.expect for spec in specs if spec.spec.spec.expect]
    scanner = LayerScanner(
        content,
        context.cache_directory(),
        keep=any(e.files or e.absent for e in expected),
        hash_files=any(f.sha256 for e in expected for f in e.files),
    )
    inputs: list[PlanInput] = []
    errors: list[Diagnostic] = []
    planned = [] if refresh_only else specs
    with ThreadPoolExecutor(max_workers=FETCHES_AT_ONCE, thread_name_prefix="cocoonplan-resolve") as pool:
        snapshots = Snapshots(content, pool)
        start_fetching(planned, context.project, pinner, snapshots, pool)
        for loaded in planned:
            node = loaded.spec.spec.node
            settings = context.project.nodes[node]
            try:
                resolved = resolve_vm(
                    loaded, content, pinner, scanner, states[node], settings.arch, snapshots
                )
            except CocoonplanError as exc:
                errors.append(Diagnostic.from_error(exc, vm=loaded.spec.name, file=loaded.file))
                continue
            inputs.append(PlanInput(loaded=loaded, resolved=resolved, node=settings))
    if any(expects_files(item) for item in inputs):
        inputs = gather_files(inputs, states, scanner, roots or {})
    views, warnings = node_views(dict(states), content, networks, releases, context.project)
    return Resolution(
        inputs=tuple(inputs),
        nodes=views,
        lock_changes=tuple(pinner.changes.values()),
        errors=tuple(errors),
        warnings=tuple(warnings),
    )


class Snapshots:
    """Each snapshot of a run resolved once, by pinned reference, label and platform: a
    thousand specs of ten snapshots read ten snapshots. Resolutions run in ``pool``, several
    at once; a failure is raised again for every VM that names the snapshot."""

    def __init__(self, content: Content, pool: Executor) -> None:
        self._content = content
        self._pool = pool
        self._resolving: dict[tuple[Reference, str, Arch], Future[ResolvedSnapshot]] = {}

    def start(self, ref: Reference, label: str, arch: Arch) -> Future[ResolvedSnapshot]:
        """The resolution of snapshot ``ref`` (pinned by digest), started when it is not yet."""
        key = (ref, label, arch)
        resolving = self._resolving.get(key)
        if resolving is None:
            resolving = self._pool.submit(resolve_snapshot, self._content, ref, label, arch)
            self._resolving[key] = resolving
        return resolving

    def get(self, ref: Reference, label: str, arch: Arch) -> ResolvedSnapshot:
        """The resolved snapshot ``ref``, waiting for it; raises what resolving it raised."""
        return self.start(ref, label, arch).result()


def start_fetching(
    specs: Sequence[LoadedSpec], project: Project, pinner: Pinner, snapshots: Snapshots, pool: Executor
) -> None:
    """Start every registry fetch the specs need that does not wait on another: each tag's
    lookup, then each snapshot's resolution once its tag is pinned. Pins are taken in the
    order :func:`resolve_vm` takes them (source, then expected base), so lock changes keep it;
    a failure is left for :func:`resolve_vm` to raise for its VM."""
    pinner.look_up((s.spec.spec.snapshot or s.spec.spec.image or "" for s in specs), pool)
    for loaded in specs:
        body = loaded.spec.spec
        with contextlib.suppress(CocoonplanError):
            source = pinner.pin(body.snapshot or body.image or "")
            if body.snapshot is not None:
                ref = parse_reference(source.ref).with_digest(source.digest)
                snapshots.start(ref, source.ref, project.nodes[body.node].arch)
            if body.expect and body.expect.base_image:
                pinner.pin(body.expect.base_image)


def state_overrides(
    values: Sequence[str], context: ProjectContext, cwd: Path, *, directories: bool
) -> dict[str, Path]:
    """Parse ``[NODE=]PATH`` command-line state locations; a bare PATH needs a one-node project.

    ``directories`` says whether they must be cocoon root directories (``--root``) or exported
    state documents (``--state``).
    """
    nodes = sorted(context.project.nodes)
    overrides: dict[str, Path] = {}
    for value in values:
        node, sep, path = value.partition("=")
        # NODE= only when the prefix is a node name; a path may hold "=" itself.
        if not sep or not re.fullmatch(NAME_PATTERN, node):
            node, path = "", value
        if not node:
            if len(nodes) != 1:
                raise CocoonplanError(
                    f"state location {value!r} does not say which node it is for",
                    hint=f"write NODE={value}; the project's nodes are: {', '.join(nodes) or 'none'}",
                )
            node = nodes[0]
        if node not in context.project.nodes:
            raise CocoonplanError(
                f"state location {value!r} names node {node!r}, which the project file does not declare",
                hint=f"the project's nodes are: {', '.join(nodes) or 'none'}",
            )
        location = (cwd / path).resolve()
        if location.is_dir() != directories:
            wanted = "a cocoon root directory" if directories else "an exported state file"
            raise CocoonplanError(
                f"{path} is not {wanted}",
                hint="--root takes a node's root directory, --state a file from `cocoonplan state export`",
            )
        if node in overrides:
            raise CocoonplanError(f"node {node} is given two state locations", hint="give one per node")
        overrides[node] = location
    return overrides


def read_nodes(
    context: ProjectContext, overrides: Mapping[str, Path], assume_empty: Sequence[str] = ()
) -> dict[str, NodeState | None]:
    """The state of every node of the project: from ``overrides``, else the project's ``state:``;
    empty for the nodes named in ``assume_empty``; None (not known) where nothing gives one.

    Unreadable or inconsistent state raises StateError: a plan never guesses what runs.
    """
    for name in assume_empty:
        node = context.project.nodes.get(name)
        if node is None:
            raise CocoonplanError(
                f"--assume-empty-node names node {name!r}, which the project file does not declare",
                hint=f"the project's nodes are: {', '.join(sorted(context.project.nodes)) or 'none'}",
            )
        if name in overrides or node.state:
            raise CocoonplanError(
                f"--assume-empty-node {name}: the node's state is known, so nothing needs assuming",
                hint="drop the option, or the node's state:/--root/--state",
            )
        if node.cocoon_version is None:
            raise CocoonplanError(
                f"--assume-empty-node {name}: an empty node shows no cocoon release to plan for",
                hint=f"set cocoonVersion for {name} in cocoonplan.yaml (what `cocoon version` prints there)",
            )
    states: dict[str, NodeState | None] = {}
    for name, node in sorted(context.project.nodes.items()):
        path = state_location(context, overrides, name)
        if path is not None:
            states[name] = read_node_state(path, node.root_dir, node.run_dir)
        elif name in assume_empty:
            states[name] = NodeState(root_dir=node.root_dir, run_dir=node.effective_run_dir)
        else:
            states[name] = None
    return states


def state_location(context: ProjectContext, overrides: Mapping[str, Path], node: str) -> Path | None:
    """Where node ``node``'s state is read from: ``--root``/``--state``, else its ``state:``."""
    settings = context.project.nodes[node]
    return overrides.get(node) or (context.resolve(settings.state) if settings.state else None)


def root_directories(context: ProjectContext, overrides: Mapping[str, Path]) -> dict[str, Path]:
    """The nodes whose state is a cocoon root directory readable from here, by name."""
    found = {name: state_location(context, overrides, name) for name in sorted(context.project.nodes)}
    return {name: path for name, path in found.items() if path is not None and path.is_dir()}


def running_base(vm: ObservedVM, state: NodeState, content: Content, arch: Arch) -> RunningBase:
    """The image a VM on the node was made from, by the digest its record holds (never by tag).

    The node's own images.json is asked first; otherwise the manifest is fetched by digest
    (an index digest resolves to the node's ``arch`` manifest).
    """
    digest = vm.settings.image_digest
    image = next((i for i in state.images if i.manifest_digest == digest), None)
    if image is not None:
        return RunningBase(ref=image.ref, digest=image.manifest_digest, layers=image.layers)
    if not digest or not vm.settings.image:
        missing = "image digest" if not digest else "image reference"
        raise StateError(
            f"VM {vm.name} ({vm.id}) records no {missing}, and images.json has no image of digest "
            f"{digest or '(none)'}, so its layers cannot be checked",
            hint="cocoon records image and image_digest for OCI VMs; check the VM's record in vms.json",
        )
    ref = parse_reference(vm.settings.image).with_digest(digest)
    manifest = content.manifest(ref, arch, digest)
    return RunningBase(
        ref=vm.settings.image, digest=manifest.digest, layers=tuple(m.digest for m in manifest.layers)
    )


def node_views(
    states: dict[str, NodeState | None],
    content: Content,
    networks: Mapping[str, str | None],
    releases: Mapping[str, CocoonVersion | None],
    project: Project,
) -> tuple[dict[str, NodeView], list[Diagnostic]]:
    views: dict[str, NodeView] = {}
    warnings: list[Diagnostic] = []
    for name, state in states.items():
        bases: dict[str, RunningBase] = {}
        for vm in state.vms if state else ():
            try:
                bases[vm.id] = running_base(vm, state, content, project.nodes[name].arch)  # type: ignore[arg-type]
            except CocoonplanError as exc:
                warnings.append(
                    Diagnostic(
                        summary=f"layer drift of VM {vm.name} on {name} not checked: {exc.summary}",
                        vm=vm.name,
                    )
                )
        views[name] = NodeView(
            name=name,
            settings=project.nodes[name],
            state=state,
            bases=bases,
            cocoon=releases[name],
            default_network=networks[name],
        )
    return views, warnings


def check_locked_base(pinner: Pinner, source: PinnedRef, base: str | None) -> None:
    # Content-addressed, a snapshot cannot change its base; a disagreement means the lock
    # file was edited by hand or belongs to another snapshot.
    entry = pinner.lock.find(source.ref)
    if entry and entry.locked.digest == source.digest and entry.locked.base_image_digest not in (None, base):
        raise LockError(
            f"{pinner.lock_display} pins {source.ref} to {source.digest} baked from "
            f"{entry.locked.base_image_digest}, but that snapshot records base {base}",
            hint="the lock file was edited; restore it from version control or run `cocoonplan lock --update`",
        )


def base_boot(
    snapshot: ResolvedSnapshot, state: NodeState | None, content: Content, scanner: LayerScanner, arch: Arch
) -> ResolvedImage | None:
    """The snapshot's base image with its boot layers located, when the node lacks a boot
    file the clone needs (cocoon's ``VerifyBaseFiles`` stats them); None otherwise."""
    base = snapshot.base_image
    payload = snapshot.ch_config.get("payload") or {}
    wanted = [BOOT_PATH.fullmatch(str(payload.get(key) or "")) for key in ("kernel", "initramfs")]
    needed = [f"{m.group('hex')}/{m.group('file')}" for m in wanted if m is not None]
    if state is None or base is None or all(n in state.boot_files for n in needed):
        return None
    ref = parse_reference(base.repository).with_digest(base.pinned.digest)
    return resolve_image(content, ref, base.pinned.ref, arch, scanner)


def resolve_vm(
    loaded: LoadedSpec,
    content: Content,
    pinner: Pinner,
    scanner: LayerScanner,
    state: NodeState | None,
    arch: Arch,
    snapshots: Snapshots,
) -> ResolvedVM:
    body = loaded.spec.spec
    source = pinner.pin(body.snapshot or body.image or "")
    ref = parse_reference(source.ref).with_digest(source.digest)
    present = present_layers(state)
    # The snapshot records its base's platform manifest: compare it with that platform's.
    expected = (
        pinner.pin_platform(body.expect.base_image, arch) if body.expect and body.expect.base_image else None
    )
    if body.snapshot is not None:
        snapshot = snapshots.get(ref, source.ref, arch)
        check_locked_base(pinner, source, snapshot.config.image_digest)
        return ResolvedVM(
            snapshot=snapshot,
            expected_base=expected,
            present_blobs=present,
            base_boot=base_boot(snapshot, state, content, scanner, arch),
        )
    return ResolvedVM(image=resolve_image(content, ref, source.ref, arch, scanner), present_blobs=present)
