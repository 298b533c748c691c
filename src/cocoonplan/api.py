"""The core facade: every CLI capability, callable from Python.

It wires the pieces in order: find the project, load specs, resolve (tags through the lock,
manifests, snapshot files, node contents), then hand resolved inputs to the pure planner.
All I/O arrives through :class:`Environment`, never from globals.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx

from cocoonplan import __version__, defaults
from cocoonplan.atomic import update_file
from cocoonplan.cocoon import MetadataEngine
from cocoonplan.context import ProjectContext, display_path, load_all, require_project
from cocoonplan.context import find_project as find_project  # callers find a project through api
from cocoonplan.errors import ApplyError, CocoonplanError, ProofError, SpecError, StateError
from cocoonplan.executors.apply import (
    NodeTarget,
    World,
    apply_node,
    check_fresh,
    left_to_cocoon,
    record_adoption,
    resumed_builds,
)
from cocoonplan.executors.blobs import BlobProgress
from cocoonplan.executors.cocoon import CocoonCLI
from cocoonplan.executors.lease import ensure_held, hold
from cocoonplan.executors.lease import force_unlock as force_unlock_lease
from cocoonplan.lock import LockedDigests, LockEntry, LockFile, RefKind, encode_lock, read_lock
from cocoonplan.observed import NodeState
from cocoonplan.oci.reference import parse_reference
from cocoonplan.oci.registry import DEFAULT_TIMEOUT_SECONDS
from cocoonplan.oci.sources import open_sources
from cocoonplan.planner import Action, Plan, make_plan
from cocoonplan.planner.compile import summarize
from cocoonplan.planner.model import BlobKind, LockChange, VMPlan
from cocoonplan.planner.rules import RULES
from cocoonplan.planner.steps import CONTENT_STEPS, Step, compile_steps
from cocoonplan.project import LOCK_FILE, HypervisorBuild, NodeConfig
from cocoonplan.proof.boot import prove
from cocoonplan.proof.host import KERNEL_ROOT_VARIABLE, KvmMode, choose_machine, missing_prerequisites
from cocoonplan.proof.target import BootTarget, node_target, planned_target
from cocoonplan.proof.verdict import Verification
from cocoonplan.releases import CocoonLine, line_of
from cocoonplan.resolvers.content import Content
from cocoonplan.resolvers.network import read_default_network
from cocoonplan.resolvers.node import DEFAULT_ROOT_DIR, read_node_root
from cocoonplan.resolvers.pins import Pinner
from cocoonplan.resolvers.release import layout_contradiction, node_release, read_cocoon_version
from cocoonplan.resolvers.resolution import (
    node_locations,
    read_nodes,
    resolve,
    root_directories,
    state_overrides,
)
from cocoonplan.resolvers.snapshot import resolve_snapshot
from cocoonplan.spec import Expectations
from cocoonplan.specfile import index_project

TIMEOUT_VARIABLE = "COCOONPLAN_TIMEOUT"
"""Seconds, when no :attr:`Environment.timeout` is given."""


@dataclass(frozen=True)
class Environment:
    """The outside world a command may touch: process environment, working directory, HTTP."""

    env: Mapping[str, str]
    cwd: Path
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    """The time, for apply's lease and the records it writes; tests pass a fixed one."""
    timeout: float | None = None
    """Seconds any one wait on the outside world may take: connecting, each read and write, a
    pooled connection, a credential helper's whole run. A registry fetch gets DEADLINE_FACTOR
    times it in all, plus a second per MIN_BYTES_PER_SECOND received (oci/registry.py).
    None: ``$COCOONPLAN_TIMEOUT``, else 30."""

    def timeout_seconds(self) -> float:
        """The effective :attr:`timeout`; a ``COCOONPLAN_TIMEOUT`` that is no positive number is an error."""
        if self.timeout is not None:
            return self.timeout
        value = self.env.get(TIMEOUT_VARIABLE, "")
        if not value:
            return DEFAULT_TIMEOUT_SECONDS
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise CocoonplanError(
                f"{TIMEOUT_VARIABLE}={value!r} is not a positive number of seconds",
                hint=f"set it to e.g. 30, or unset it for the default of {DEFAULT_TIMEOUT_SECONDS:g}",
            )
        return seconds

    @contextmanager
    def http(self) -> Iterator[httpx.Client]:
        """An HTTP client for registries, closed when the command ends."""
        timeout = httpx.Timeout(self.timeout_seconds())
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            yield client


def _lock_path(context: ProjectContext) -> tuple[Path, str]:
    path = context.directory / LOCK_FILE
    return path, display_path(path, context.directory)


def plan(
    paths: Sequence[Path],
    environment: Environment,
    *,
    locked: bool = False,
    update_lock: bool = False,
    refresh_only: bool = False,
    roots: Sequence[str] = (),
    states: Sequence[str] = (),
    assume_empty: Sequence[str] = (),
    adopting: Collection[tuple[str, str]] = (),
) -> Plan:
    """Plan every VM under ``paths`` against its node.

    Spec, project and node-state errors raise; a VM that fails to resolve or plan becomes an
    entry in ``Plan.errors`` while the others are still planned. Every node of the project
    is read, so that a VM whose spec was removed can be deleted (only if cocoonplan made it).
    ``roots`` (``[NODE=]DIR``, cocoon root directories) and ``states`` (``[NODE=]FILE``,
    exported state documents) override where a node's state is read from; ``assume_empty``
    names nodes without state to plan as empty (otherwise their VMs are planned as unknown).
    ``adopting`` names (node, VM) pairs cocoonplan did not create to plan as if it had.
    """
    context, specs = load_all(paths, environment.cwd)
    lock_path, lock_display = _lock_path(context)
    lock = read_lock(lock_path, lock_display)
    locations = node_locations(context, environment.cwd, roots, states)
    nodes = read_nodes(context, locations, assume_empty)
    with environment.http() as client, open_sources(context, client, environment.env) as sources:
        resolution = resolve(
            context,
            specs,
            nodes,
            sources,
            lock=lock,
            lock_display=lock_display,
            locked=locked,
            update_lock=update_lock,
            refresh_only=refresh_only,
            roots=root_directories(context, locations),
        )
    return make_plan(
        resolution.inputs,
        nodes=resolution.nodes,
        tool_version=__version__,
        claimed={*index_project(context.directory).vms, *((s.spec.spec.node, s.spec.name) for s in specs)},
        scope=[display_path(environment.cwd / p, context.directory) for p in paths] or ["."],
        refresh_only=refresh_only,
        lock_changes=resolution.lock_changes,
        errors=resolution.errors,
        warnings=resolution.warnings,
        adopting=adopting,
    )


@dataclass(frozen=True)
class LockResult:
    """What ``lock`` changed, and where the lock file is."""

    path: Path
    changes: tuple[LockChange, ...]
    removed: tuple[str, ...]
    written: bool


def lock(paths: Sequence[Path], environment: Environment, *, update: bool = False) -> LockResult:
    """Resolve every reference once and write ``cocoonplan.lock``; ``update`` re-resolves moved tags.

    Entries no spec anywhere in the project references any more are dropped (locking part of
    the project keeps the others'). Nothing is written when a reference fails.
    """
    context, specs = load_all(paths, environment.cwd)
    lock_path, lock_display = _lock_path(context)
    old = read_lock(lock_path, lock_display)
    entries: dict[str, LockEntry] = {}
    with environment.http() as client, open_sources(context, client, environment.env) as sources:
        content = Content(sources)
        pinner = Pinner(content, old, lock_display, update=update)
        for loaded in specs:
            body = loaded.spec.spec
            wanted = [
                (body.snapshot or body.image or "", RefKind.SNAPSHOT if body.snapshot else RefKind.IMAGE)
            ]
            if body.expect and body.expect.base_image:
                wanted.append((body.expect.base_image, RefKind.IMAGE))
            for original, kind in wanted:
                pinned = pinner.pin(original)
                base = None
                if kind is RefKind.SNAPSHOT:
                    ref = parse_reference(original).with_digest(pinned.digest)
                    snapshot = resolve_snapshot(content, ref, original, context.project.nodes[body.node].arch)
                    # Each child of an index records its own platform's base: only a single
                    # manifest has one base to lock.
                    base = snapshot.config.image_digest if snapshot.pinned.digest == pinned.digest else None
                entries[original] = LockEntry(
                    original=original,
                    kind=kind,
                    locked=LockedDigests(digest=pinned.digest, base_image_digest=base),
                )
    in_use = index_project(context.directory).references
    kept = [e for e in old.references if e.original not in entries and e.original in in_use]
    new = LockFile(references=(*entries.values(), *kept))
    removed = tuple(sorted(e.original for e in old.references if e.original not in entries and e not in kept))
    written = update_file(lock_path.parent, lock_path.name, encode_lock(new))
    applied = tuple(c for c in pinner.changes.values() if update or c.before is None)
    return LockResult(path=lock_path, changes=applied, removed=removed, written=written)


@dataclass(frozen=True)
class Rendered:
    """A plan for ``render``, with the VMs other specs of the project still define."""

    plan: Plan
    elsewhere: frozenset[tuple[str, str]]
    """(node, VM) pairs defined by specs outside the rendered paths: their files are kept."""


def render(paths: Sequence[Path], environment: Environment) -> Rendered:
    """Plan for ``render --dir``: the plan, and which other VMs' rendered files must be kept."""
    result = plan(paths, environment)
    context, _ = load_all(paths, environment.cwd)
    planned = {(vm.node, vm.name) for vm in result.vms if vm.action is not Action.DELETE}
    return Rendered(plan=result, elsewhere=index_project(context.directory).vms - planned)


def export_state(
    root: Path,
    environment: Environment,
    root_dir: str | None = None,
    run_dir: str | None = None,
    cni_conf_dir: Path | None = None,
    cocoon: str | None = None,
    cloud_hypervisor: HypervisorBuild | None = None,
) -> NodeState:
    """Read the cocoon root found at ``root`` (relative to the working directory) for export.

    ``root_dir`` and ``run_dir`` are the node's own ``--root-dir`` (default ``/var/lib/cocoon``)
    and ``--run-dir`` (default ``<root_dir>/run``): the paths its records hold. ``cni_conf_dir``
    (the node's ``--cni-conf-dir`` or a copy) gives the state its ``default_network``;
    ``cocoon`` (the node's cocoon binary; default: ``cocoon`` on ``PATH``, when there is one) its
    ``cocoon_version``, from ``cocoon version``; ``cloud_hypervisor`` its Cloud Hypervisor build
    (as given: nothing the CH binary prints tells cocoonstack's fork from a stock release).
    The result's ``recovered`` lists the metadata files read from their ``.prev`` generation.
    Raises StateError when the root or conf dir cannot be read or contradicts itself, the
    binary does not answer, or it names a release that cannot have written the root; nothing
    is written.
    """
    state = read_node_root(environment.cwd / root, root_dir or DEFAULT_ROOT_DIR, run_dir)
    found: dict[str, str | None] = {}
    if cni_conf_dir is not None:
        found["default_network"] = read_default_network(environment.cwd / cni_conf_dir)
    # On the node itself its cocoon is on PATH: ask it, unless told which binary to ask.
    binary = cocoon or shutil.which("cocoon", path=environment.env.get("PATH"))
    if binary is not None:
        version = read_cocoon_version(binary, environment.env)
        _refuse_contradiction(root, binary, version, state)
        found["cocoon_version"] = version
    if cloud_hypervisor is not None:
        found["cloud_hypervisor"] = cloud_hypervisor
    return state.model_copy(update=found)


def _refuse_contradiction(root: Path, binary: str, version: str, state: NodeState) -> None:
    """A document that no plan would accept is not written: a binary of a release that cannot
    have written this root is another node's, or the root is."""
    try:
        line = line_of(version)
    except ValueError:
        return  # recorded as printed: planning names the unsupported version
    evidence = layout_contradiction(line, state)
    if evidence is not None:
        raise StateError(
            f"{root}: `{binary} version` says {version}, but {evidence}",
            hint="pass the node's own cocoon binary with --cocoon, or export the root of the node it runs on",
        )


def node_root(
    node: str, environment: Environment, roots: Sequence[str] = (), context: ProjectContext | None = None
) -> Path:
    """The local directory of node ``node``'s cocoon root, where apply writes: ``--root`` for
    it, else its ``state:`` when that is a directory (an exported document cannot be written).
    ``context`` is the project declaring the node (default: the working directory's, which
    must have one)."""
    if context is None:
        context = require_project([Path()], environment.cwd, command="cocoonplan")
    settings = context.project.nodes.get(node)
    if settings is None:
        raise CocoonplanError(
            f"node {node!r} is not declared in the project file",
            hint=f"the project's nodes are: {', '.join(sorted(context.project.nodes)) or 'none'}",
        )
    local = state_overrides(roots, context, environment.cwd, directories=True).get(node)
    if local is None and settings.state:
        local = context.resolve(settings.state)
    if local is None or not local.is_dir():
        raise CocoonplanError(
            f"node {node} has no cocoon root directory reachable from here",
            hint=f"point its state: at its root directory, or pass --root {node}=DIR",
        )
    return local


def force_unlock(node: str, lease_id: str, environment: Environment, roots: Sequence[str] = ()) -> None:
    """Remove node ``node``'s apply lease ``lease_id`` (another ID is refused); the node is
    the working directory's project's, which must have one."""
    context = require_project([Path()], environment.cwd, command="`cocoonplan force-unlock`")
    force_unlock_lease(node_root(node, environment, roots, context), node, lease_id)


@dataclass(frozen=True)
class ApplyResult:
    """What apply did: the steps carried out and the IDs cocoon chose, per node."""

    steps: tuple[Step, ...]
    created: dict[str, dict[str, str]]
    left_to_cocoon: tuple[Step, ...] = ()
    """Steps ``--content-only`` left for the node's cocoon (image records on SQLite nodes)."""


def apply(
    saved: Plan,
    environment: Environment,
    *,
    targets: Sequence[str] = (),
    content_only: bool = False,
    lock_wait: timedelta = timedelta(0),
    progress: BlobProgress,
    roots: Sequence[str] = (),
    project: Sequence[Path] = (),
) -> ApplyResult:
    """Carry out ``saved`` (a plan read by :func:`cocoonplan.planfile.read_plan`, its digest
    checked) on its nodes: steps → lease → freshness → execute → prove, node by node.

    The project is the first found at or above one of ``project`` (paths relative to the
    working directory, tried in order; default: the working directory): the CLI passes the
    directory the plan file names (``Plan.project``, relative to the file), then the working
    directory. None found raises, naming where it looked.

    ``content_only`` runs the content steps alone (no cocoon binary needed). Raises before
    changing anything when the plan cannot be carried out or is stale.
    """
    steps = compile_steps(saved, targets)
    if content_only:
        steps = tuple(step for step in steps if step.kind in CONTENT_STEPS)
    context = require_project(project or [Path()], environment.cwd, command="`cocoonplan apply`")
    nodes = sorted({step.node for step in steps})
    locals_ = {node: node_root(node, environment, roots, context) for node in nodes}

    def read_state(node: str) -> NodeState:
        settings = context.project.nodes[node]
        return read_node_root(locals_[node], settings.root_dir, settings.run_dir)

    def replan(node: str) -> Plan:
        files = sorted({vm.spec_file for vm in saved.vms if vm.node == node and vm.spec_file})
        overrides = [f"{node}={locals_[node]}"]
        return plan([context.directory / f for f in files], environment, roots=overrides)

    created: dict[str, dict[str, str]] = {}
    deferred: list[Step] = []
    with environment.http() as client, open_sources(context, client, environment.env) as sources:
        # Every node's cocoon is asked first: a release the plan was not made for changes nothing.
        node_targets = {
            node: apply_target(
                node,
                context.project.nodes[node],
                locals_[node],
                read_state(node),
                saved,
                environment,
                content_only,
            )
            for node in nodes
        }
        for node in nodes:
            target = node_targets[node]
            with hold(
                locals_[node],
                node=node,
                owner=environment.env.get("USER", "cocoonplan"),
                host=socket.gethostname(),
                pid=os.getpid(),
                operation="apply --content-only" if content_only else "apply",
                clock=environment.clock,
                sleep=time.sleep,
                wait=lock_wait,
            ) as lease:
                held = partial(ensure_held, locals_[node], node, lease)
                world = World({node: target}, sources, progress, environment.clock, read_state, replan, held)
                state = read_state(node)
                # A kill -9 mid-apply: what this same plan already built is checked and not redone.
                resumed = resumed_builds(saved, node, state, locals_[node], targets)
                check_fresh(saved, node, state, targets, resumed)
                node_steps = [s for s in steps if s.node == node]
                deferred += left_to_cocoon(node_steps, target)
                node_steps = [s for s in node_steps if s not in deferred]
                created[node] = apply_node(saved, node_steps, node, world, targets, resumed).created
    done = tuple(step for step in steps if step not in deferred)
    return ApplyResult(steps=done, created=created, left_to_cocoon=tuple(deferred))


@dataclass(frozen=True)
class Adoption:
    """A VM cocoonplan did not create, planned against its spec as if it had (``import``)."""

    plan: Plan
    """The plan of the spec file, the VM planned as if owned."""
    vm: VMPlan
    """That VM's entry: how it differs from the spec."""
    local: Path
    """The node's cocoon root directory, where its ownership record is written."""
    settings: NodeConfig
    """The node's settings in the spec's project (how its root is read)."""

    def shown(self) -> Plan:
        """The plan of this VM alone, to show before it is imported."""
        vm = self.vm
        alone = self.plan.model_copy(
            update={
                "vms": (vm,),
                "errors": (),
                # Warnings about other VMs (one of the same name on another node) are not its.
                "warnings": tuple(w for w in self.plan.warnings if w.vm is None),
                "summary": summarize([vm], []),
            }
        )
        return alone.model_copy(update={"digest": alone.content_digest()})


def plan_import(
    node: str, name: str, spec: Path, environment: Environment, roots: Sequence[str] = ()
) -> Adoption:
    """Plan the VM ``name`` on ``node``, which cocoonplan did not create, against the spec file
    ``spec`` as if cocoonplan owned it; nothing is written. Raises when the spec does not
    define it, the node has no root reachable from here, the VM is missing or already owned,
    or the spec cannot make it (another mode, an error planning it). The node is the one the
    spec's project (at or above the spec file) declares."""
    context = require_project([spec], environment.cwd, command="`cocoonplan import`")
    local = node_root(node, environment, roots, context)
    settings = context.project.nodes[node]
    _, specs = load_all([spec], environment.cwd)
    if not any(s.spec.spec.node == node and s.spec.name == name for s in specs):
        defined = ", ".join(sorted(f"{s.spec.spec.node}/{s.spec.name}" for s in specs)) or "no VM"
        raise SpecError(
            f"defines {defined}, not {node}/{name}",
            file=str(spec),
            hint=f"give the spec file that defines VM {name} on node {node}",
        )
    state = _local_state(local, settings)
    observed = state.vm_named(name)
    if observed is None:
        raise StateError(
            f"no VM named {name} is on node {node}",
            hint=f"`cocoonplan import` takes a VM cocoon already runs; `cocoonplan apply {spec}` creates one",
        )
    if observed.owner is not None:
        raise StateError(
            f"VM {name} ({observed.id}) on node {node} is already cocoonplan's (from {observed.owner.spec_file})",
            hint="plan and apply it as any other VM: `cocoonplan plan`",
        )
    planned = plan([spec], environment, roots=[f"{node}={local}"], adopting={(node, name)})
    if failed := next((e for e in planned.errors if e.vm == name), None):
        raise CocoonplanError(failed.summary, detail=failed.detail, hint=failed.hint)
    vm = next(v for v in planned.vms if v.node == node and v.name == name)
    if vm.action is Action.UNKNOWN:
        raise StateError(
            f"VM {name} on node {node} cannot be imported now: {vm.reason}",
            hint="import it once cocoon records it as running, stopped or created",
        )
    return Adoption(plan=planned, vm=vm, local=local, settings=settings)


def _local_state(local: Path, settings: NodeConfig) -> NodeState:
    return read_node_root(local, settings.root_dir, settings.run_dir)


def adopt(adoption: Adoption, environment: Environment) -> str:
    """Record the planned VM in its node's ownership file under the node's lease, refusing it
    when the VM changed since it was planned; returns its ID."""
    vm = adoption.vm
    with hold(
        adoption.local,
        node=vm.node,
        owner=environment.env.get("USER", "cocoonplan"),
        host=socket.gethostname(),
        pid=os.getpid(),
        operation=f"import {vm.node}/{vm.name}",
        clock=environment.clock,
        sleep=time.sleep,
    ):
        state = _local_state(adoption.local, adoption.settings)
        observed = state.vm_named(vm.name)
        if (
            observed is not None
            and observed.owner is None
            and observed.fingerprint() != vm.observed_fingerprint
        ):
            raise StateError(
                f"VM {vm.name} on node {vm.node} changed since it was planned for import",
                hint="run `cocoonplan import` again",
            )
        return record_adoption(adoption.plan, vm.node, vm.name, adoption.local, state)


def apply_target(
    node: str,
    settings: NodeConfig,
    local: Path,
    state: NodeState,
    saved: Plan,
    environment: Environment,
    content_only: bool,
) -> NodeTarget:
    """How apply acts on ``node``: its cocoon (asked for its release, which must be the line the
    plan was made for; none for content only) and the rules of that line."""
    planned = next((n.cocoon for n in saved.nodes if n.name == node), None)
    release = node_release(node, settings, state)
    line = release.line if release else planned.line if planned else CocoonLine.V0_3
    cocoon = None
    if not content_only:
        cocoon = CocoonCLI(
            command=tuple(shlex.split(settings.cocoon)),
            root_dir=settings.root_dir,
            run_dir=settings.effective_run_dir,
            dns=settings.dns,
            env=environment.env,
        )
        running = cocoon.version()
        try:
            line = line_of(running)
        except ValueError as exc:
            raise ApplyError(
                f"node {node}: {exc}", hint="plan and apply with a cocoonplan that supports it"
            ) from exc
        if planned is not None and planned.line is not line:
            raise ApplyError(
                f"node {node} runs cocoon {running}, and the plan was made for the {planned.line} line "
                f"({planned.version}, {planned.source})",
                hint="set the node's cocoonVersion to what it runs, plan again and review",
            )
    engine = state.metadata_engine
    if engine is None and line is CocoonLine.V0_6:
        # A root without metadata is one cocoon will give the SQLite store (cocoon-later.md §2.1,
        # ResolveMetaBackend): writing images.json there would make cocoon keep the JSON engine.
        engine = MetadataEngine.SQLITE
    return NodeTarget(node, local, RULES[line], engine, cocoon)


BOOT_TIMEOUT_SECONDS = defaults.BOOT_TIMEOUT_SECONDS


def verify_boot(
    paths: Sequence[Path],
    environment: Environment,
    *,
    progress: BlobProgress,
    kernel_root: Path | None = None,
    timeout: float = BOOT_TIMEOUT_SECONDS,
    kvm: KvmMode = KvmMode.AUTO,
    as_on_node: bool = False,
    roots: Sequence[str] = (),
    states: Sequence[str] = (),
    inventory: bool = False,
) -> tuple[Verification, ...]:
    """Cold-boot every VM under ``paths`` in a throwaway QEMU microVM and check its spec's
    ``expect.files`` and ``expect.absent`` in the root the guest assembles (:mod:`cocoonplan.proof`).

    The disks booted are those the plan lists, or, with ``as_on_node``, those the node's record
    of the VM holds (read from its root directory, nothing planned). ``kernel_root`` (default
    ``$COCOONPLAN_KERNEL_ROOT``) is an unpacked linux-image; each boot is bounded by ``timeout``
    seconds; ``kvm`` says whether KVM is used. ``inventory`` makes each guest list every file of
    its root as well (:attr:`cocoonplan.proof.console.BootReport.files`). Raises before booting
    when the machine lacks something or a VM cannot be planned; a VM that boots without its
    files is a :class:`Verification` that is not ``ok``.
    """
    if not (math.isfinite(timeout) and timeout > 0):
        raise CocoonplanError(
            f"a boot timeout of {timeout} s is no positive number of seconds",
            hint=f"give --timeout a number of seconds above 0 (default {BOOT_TIMEOUT_SECONDS:g})",
        )
    chosen = kernel_root or environment.env.get(KERNEL_ROOT_VARIABLE)
    kernel = environment.cwd / chosen if chosen else None
    missing = missing_prerequisites(kernel)
    if missing or kernel is None:
        raise ProofError(
            "this machine cannot boot a proof guest: it lacks " + "; ".join(missing),
            hint="each item says how to get it; scripts/test installs all of them",
        )
    machine = choose_machine(kvm)
    context, specs = load_all(paths, environment.cwd)
    expected = {(s.spec.spec.node, s.spec.name): s.spec.spec.expect for s in specs}
    locations = node_locations(context, environment.cwd, roots, states)
    local_roots = root_directories(context, locations)
    if as_on_node:
        nodes = read_nodes(context, locations)
        targets = [_on_node(nodes, node, name, expect) for (node, name), expect in sorted(expected.items())]
        blobs = {}
    else:
        planned = plan(paths, environment, roots=roots, states=states)
        if planned.errors:
            first = planned.errors[0]
            raise CocoonplanError(
                f"VM {first.vm or '?'} cannot be planned, so it cannot be booted: {first.summary}",
                detail=first.detail,
                hint=first.hint or "run `cocoonplan plan` to see every error",
            )
        vms = [vm for vm in planned.vms if (vm.node, vm.name) in expected]
        targets = [planned_target(vm, expected[(vm.node, vm.name)]) for vm in vms]
        blobs = {b.digest: b for vm in vms for b in vm.blobs if b.kind is BlobKind.LAYER}
    with environment.http() as client, open_sources(context, client, environment.env) as sources:
        return prove(
            targets,
            kernel_root=kernel,
            machine=machine,
            timeout=timeout,
            local_roots=local_roots,
            blobs=blobs,
            sources=sources,
            progress=progress,
            inventory=inventory,
        )


def _on_node(
    nodes: Mapping[str, NodeState | None], node: str, name: str, expect: Expectations | None
) -> BootTarget:
    state = nodes[node]
    if state is None:
        raise StateError(
            f"--as-on-node: the state of node {node} is not known, so VM {name}'s disks are not either",
            hint=f"give the node's cocoon root directory: --root {node}=DIR, or its state: in cocoonplan.yaml",
        )
    vm = state.vm_named(name)
    if vm is None:
        raise StateError(
            f"--as-on-node: no VM named {name} is on node {node}, so there are no disks of it to boot",
            hint="verify the planned disks instead (without --as-on-node)",
        )
    return node_target(node, vm, state.root_dir, expect)
