"""The core facade: every CLI capability, callable from Python.

It wires the pieces in order: find the project, load specs, resolve (tags through the lock,
manifests, snapshot files, node contents), then hand resolved inputs to the pure planner.
All I/O arrives through :class:`Environment`, never from globals.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from cocoonplan import __version__
from cocoonplan.document import read_documents
from cocoonplan.errors import CocoonplanError, SpecError
from cocoonplan.lock import LockedDigests, LockEntry, LockFile, RefKind, encode_lock, read_lock
from cocoonplan.oci.reference import parse_reference
from cocoonplan.oci.sources import open_sources
from cocoonplan.planner import Plan, PlanInput, make_plan
from cocoonplan.planner.model import Diagnostic, LockChange
from cocoonplan.project import LOCK_FILE, PROJECT_FILE, Project, ProjectContext
from cocoonplan.resolved import ResolvedVM
from cocoonplan.resolvers.content import Content
from cocoonplan.resolvers.image import BootScanner, resolve_image
from cocoonplan.resolvers.node import present_layers
from cocoonplan.resolvers.pins import Pinner
from cocoonplan.resolvers.snapshot import resolve_snapshot
from cocoonplan.spec import LoadedSpec, check_unique, load_specs

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Environment:
    """The outside world a command may touch: process environment, working directory, HTTP."""

    env: Mapping[str, str]
    cwd: Path
    timeout: float = 30.0

    @contextmanager
    def http(self) -> Iterator[httpx.Client]:
        """An HTTP client for registries, closed when the command ends."""
        with httpx.Client(timeout=httpx.Timeout(self.timeout), follow_redirects=True) as client:
            yield client


def _display(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def find_project(paths: Sequence[Path], cwd: Path) -> ProjectContext:
    """Find the nearest ``cocoonplan.yaml`` at or above the given paths; all must share it."""
    found: set[Path | None] = set()
    for path in paths or [cwd]:
        start = (cwd / path).resolve()
        start = start if start.is_dir() else start.parent
        found.add(
            next((d / PROJECT_FILE for d in (start, *start.parents) if (d / PROJECT_FILE).is_file()), None)
        )
    if len(found) > 1:
        raise CocoonplanError(
            "the given paths belong to different projects: "
            + ", ".join(sorted(str(f) if f else "(none)" for f in found)),
            hint="plan one project at a time",
        )
    file = found.pop()
    if file is None:
        return ProjectContext(project=Project(), directory=cwd.resolve(), file=None)
    return ProjectContext(
        project=load_project(file, _display(file, cwd.resolve())), directory=file.parent, file=file
    )


def load_project(file: Path, display: str) -> Project:
    """Read and validate a project file; errors name file:line:column."""
    documents = read_documents(file, display)
    if len(documents) != 1:
        raise SpecError("a project file holds exactly one YAML document", file=display)
    document = documents[0]
    try:
        return Project.model_validate(document.data)
    except ValidationError as exc:
        raise document.validation_error(exc) from exc


def spec_files(paths: Sequence[Path], cwd: Path) -> list[Path]:
    """The YAML files named, and those found below named directories, sorted, without duplicates."""
    files: list[Path] = []
    for path in paths:
        full = (cwd / path).resolve()
        if full.is_dir():
            files += sorted(
                p
                for p in full.rglob("*")
                if p.suffix in SPEC_SUFFIXES
                and p.is_file()
                and p.name != PROJECT_FILE
                and not any(part.startswith(".") for part in p.relative_to(full).parts)
            )
        elif full.is_file():
            files.append(full)
        else:
            raise CocoonplanError(f"{path}: no such file or directory")
    return list(dict.fromkeys(files))


def load_all(paths: Sequence[Path], environment: Environment) -> tuple[ProjectContext, list[LoadedSpec]]:
    """Find the project and load every VM spec under ``paths``; any invalid spec fails the whole call."""
    context = find_project(paths, environment.cwd)
    specs: list[LoadedSpec] = []
    for file in spec_files(paths, environment.cwd):
        specs += load_specs(file, _display(file, context.directory), context.project.nodes)
    check_unique(specs)
    return context, specs


def _lock_path(context: ProjectContext) -> tuple[Path, str]:
    path = context.directory / LOCK_FILE
    return path, _display(path, context.directory)


def _state_dir(context: ProjectContext, node: str) -> Path | None:
    state = context.project.nodes[node].state
    return context.resolve(state) if state else None


def _resolve_vm(
    loaded: LoadedSpec, content: Content, pinner: Pinner, scanner: BootScanner, context: ProjectContext
) -> ResolvedVM:
    body = loaded.spec.spec
    source = pinner.pin(body.snapshot or body.image or "")
    ref = parse_reference(source.ref).with_digest(source.digest)
    present = present_layers(_state_dir(context, body.node))
    expected = pinner.pin(body.expect.base_image) if body.expect and body.expect.base_image else None
    if body.snapshot is not None:
        snapshot = resolve_snapshot(content, ref, source.ref)
        return ResolvedVM(snapshot=snapshot, expected_base=expected, present_blobs=present)
    return ResolvedVM(image=resolve_image(content, ref, source.ref, scanner), present_blobs=present)


def plan(
    paths: Sequence[Path], environment: Environment, *, locked: bool = False, update_lock: bool = False
) -> Plan:
    """Plan every VM under ``paths``. Spec errors raise; a VM that fails to resolve or plan
    becomes an entry in ``Plan.errors`` while the others are still planned."""
    context, specs = load_all(paths, environment)
    lock_path, lock_display = _lock_path(context)
    lock = read_lock(lock_path, lock_display)
    inputs: list[PlanInput] = []
    errors: list[Diagnostic] = []
    with environment.http() as client:
        sources = open_sources(context, client, environment.env)
        try:
            content = Content(sources)
            pinner = Pinner(content, lock, lock_display, locked=locked, update=update_lock)
            scanner = BootScanner(content, context.resolve(context.project.cache))
            for loaded in specs:
                try:
                    resolved = _resolve_vm(loaded, content, pinner, scanner, context)
                except CocoonplanError as exc:
                    errors.append(
                        Diagnostic(
                            summary=exc.summary,
                            detail=exc.detail,
                            hint=exc.hint,
                            vm=loaded.spec.name,
                            file=loaded.file,
                        )
                    )
                    continue
                inputs.append(
                    PlanInput(
                        loaded=loaded, resolved=resolved, node=context.project.nodes[loaded.spec.spec.node]
                    )
                )
        finally:
            sources.close()
    return make_plan(
        inputs, tool_version=__version__, lock_changes=tuple(pinner.changes.values()), errors=errors
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

    Entries no spec references any more are dropped. Nothing is written when a reference fails.
    """
    context, specs = load_all(paths, environment)
    lock_path, lock_display = _lock_path(context)
    old = read_lock(lock_path, lock_display)
    entries: dict[str, LockEntry] = {}
    with environment.http() as client:
        sources = open_sources(context, client, environment.env)
        try:
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
                        base = resolve_snapshot(content, ref, original).config.image_digest
                    entries[original] = LockEntry(
                        original=original,
                        kind=kind,
                        locked=LockedDigests(digest=pinned.digest, base_image_digest=base),
                    )
        finally:
            sources.close()
    new = LockFile(references=tuple(entries.values()))
    removed = tuple(sorted(e.original for e in old.references if e.original not in entries))
    text = encode_lock(new)
    written = not lock_path.exists() or lock_path.read_text() != text
    if written:
        lock_path.write_text(text)
    applied = tuple(c for c in pinner.changes.values() if update or c.before is None)
    return LockResult(path=lock_path, changes=applied, removed=removed, written=written)


def validate(paths: Sequence[Path], environment: Environment) -> list[LoadedSpec]:
    """Validate every spec under ``paths`` offline; raises the first error found."""
    return load_all(paths, environment)[1]
