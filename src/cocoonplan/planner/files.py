"""File expectations: what a VM's root filesystem holds, proven from its layers before it runs.

cocoon's guest mounts the layers with overlayfs, top layer first (``cocoon.layers``), so a path
is looked up here the way overlayfs looks it up: component by component, each directory merged
from the layers that hold it, top down, until a whiteout hides the lower ones, a layer's
directory is opaque, or a layer holds something other than a directory there. Symbolic links
on the way are followed inside the guest's root, never on this machine.

The layers' trees arrive as evidence (:class:`~cocoonplan.resolved.FileEvidence`): the resolver
runs :func:`vm_checks` itself against the real layers and records every lookup, and the planner
runs it again over the record, so it decides from exactly what was read, without I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cocoonplan.cocoon import DiskRole, layer_hex
from cocoonplan.errors import FileExpectationError
from cocoonplan.model import hex_to_digest, short_digest
from cocoonplan.observed import ObservedVM
from cocoonplan.planner.model import FileCheck, FileExpect, FileSource, FileVerdict
from cocoonplan.resolved import EntryKind, FileEvidence, KnownImage, LayerEntry, ResolvedVM
from cocoonplan.spec import Expectations, ExpectedFile, LoadedSpec

MAX_LINKS = 40
"""Symbolic links followed in one lookup before it gives up, as Linux's path walk does."""


class UnreadError(Exception):
    """A layer whose tree is not known; the lookup's answer may depend on it."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


Look = Callable[[str, str], LayerEntry | None]
"""``look(layer digest, absolute path)``: the layer's own entry there, or None when it holds
nothing there; raises :class:`UnreadError` for a layer whose tree is not known."""


@dataclass(frozen=True)
class Hit:
    """The path resolves to ``entry``, provided by layer ``layer`` of the stack."""

    path: str
    """The path resolved through symbolic links."""
    layer: int
    entry: LayerEntry


@dataclass(frozen=True)
class Miss:
    """Nothing is at the path."""

    hidden_by: int | None = None
    """The layer whose whiteout hides it from the layers below."""


@dataclass(frozen=True)
class Unknown:
    """The answer depends on layer ``layer``, which could not be read."""

    layer: int
    why: str


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


def _joined(base: Sequence[str], target: str) -> list[str]:
    """The components of a link's ``target`` read in directory ``base``; ``..`` stops at the root."""
    out = [] if target.startswith("/") else list(base)
    for part in _parts(target):
        if part == "..":
            if out:
                out.pop()
        else:
            out.append(part)
    return out


def _merge(
    stack: Sequence[str], live: Sequence[int], path: str, look: Look, *, at_root: bool
) -> tuple[tuple[int, LayerEntry] | None, list[int], int | None, dict[int, str]]:
    """Among the layers ``live`` (top down): the topmost entry at ``path``, the layers whose
    directory there merges into it, the layer whose whiteout hid the path (when nothing was
    found), and the layers that could not be read, with why.

    A layer that cannot be read is kept as if its directory merged: whether it matters is
    decided by the answer (:func:`_settled`).
    """
    found: tuple[int, LayerEntry] | None = None
    merged: list[int] = []
    hidden = None
    unread: dict[int, str] = {}
    for index in live:
        try:
            entry = look(stack[index], path)
            # At the top, the layers below an opaque root are hidden as below any opaque directory.
            opaque_root = at_root and _is_opaque(look(stack[index], "/"))
        except UnreadError as exc:
            unread[index] = exc.why
            merged.append(index)
            continue
        if entry is not None and entry.kind is EntryKind.WHITEOUT:
            if found is None:
                hidden = index
            break
        if entry is not None:
            found = found or (index, entry)
            if entry.kind is not EntryKind.DIRECTORY:
                break  # a non-directory hides what is below it; below an upper directory, it ends the merge
            merged.append(index)
            if entry.opaque:
                break
        if opaque_root:
            break
    return found, merged, hidden, unread


def _is_opaque(entry: LayerEntry | None) -> bool:
    return entry is not None and entry.kind is EntryKind.DIRECTORY and entry.opaque


def _settled(unread: dict[int, str], layer: int | None) -> Unknown | None:
    """Unknown when a layer that could not be read was passed above the layer that decided a
    component (any layer, when none did): it might hold the path, or hide it. A layer below
    cannot change what an upper one shows."""
    above = [index for index in unread if layer is None or index > layer]
    return Unknown(max(above), unread[max(above)]) if above else None


def locate(stack: Sequence[str], path: str, look: Look, *, follow: bool) -> Hit | Miss | Unknown:
    """What the merged root of ``stack`` (layer digests, bottom first) holds at ``path``.

    Symbolic links on the way are followed within the root; a final one only with ``follow``.
    """
    parts = _parts(path)
    links = depth = 0
    live = list(reversed(range(len(stack))))
    while parts:
        component = "/" + "/".join(parts[: depth + 1])
        found, merged, hidden, unread = _merge(stack, live, component, look, at_root=depth == 0)
        if found is None:
            return _settled(unread, hidden) or Miss(hidden)
        layer, entry = found
        unknown = _settled(unread, layer)
        if unknown is not None:
            return unknown
        last = depth + 1 == len(parts)
        if entry.kind is EntryKind.SYMLINK and (follow or not last):
            links += 1
            if links > MAX_LINKS or not entry.target:
                return Miss()  # ELOOP, or ENOENT for an empty target
            parts = _joined(parts[:depth], entry.target) + parts[depth + 1 :]
            live, depth = list(reversed(range(len(stack)))), 0
            continue
        if last:
            return Hit("/" + "/".join(parts), layer, entry)
        if entry.kind is not EntryKind.DIRECTORY:
            return Miss()  # ENOTDIR
        live, depth = merged, depth + 1
    # Every link led back to the root, a directory in every image with a layer.
    return Hit("/", len(stack) - 1, LayerEntry(kind=EntryKind.DIRECTORY, mode=0o755)) if stack else Miss()


@dataclass(frozen=True)
class Stack:
    """Layers merged into one root, and how to name them."""

    layers: tuple[str, ...]
    """Digests, bottom first."""
    label: str
    """``its 11 planned layers``, ``the 6 layers it runs on``."""


def _layer_name(stack: Stack, index: int) -> str:
    return f"layer {index} ({short_digest(stack.layers[index])})"


def _sources(path: str, images: Sequence[KnownImage], look: Look, present: bool) -> tuple[FileSource, ...]:
    found = []
    for image in images:
        located = locate(image.layers, path, look, follow=present)
        if isinstance(located, Hit):
            found.append(
                FileSource(
                    image=image.ref,
                    digest=image.digest,
                    layer=located.layer,
                    layer_digest=image.layers[located.layer],
                )
            )
    return tuple(found)


def _content_problems(want: ExpectedFile, hit: Hit) -> tuple[list[str], list[str]]:
    """(failures, unknowns) of the content and mode a spec asks for."""
    failures: list[str] = []
    unknowns: list[str] = []
    entry = hit.entry
    if want.sha256 is not None:
        if entry.kind is not EntryKind.FILE:
            failures.append(f"it is a {entry.kind.value}, not a regular file whose content has a sha256")
        elif entry.sha256 is None:
            unknowns.append(
                "its content is not known (the layer was read from a node's EROFS image, not its OCI blob)"
            )
        elif entry.sha256 != want.sha256:
            failures.append(f"its content's sha256 is {entry.sha256[:12]}…, not {want.sha256[:12]}…")
    if want.mode is not None and entry.mode != int(want.mode, 8):
        failures.append(f"its mode is {entry.mode:04o}, not {int(want.mode, 8):04o}")
    return failures, unknowns


def check(want: ExpectedFile | str, stack: Stack, images: Sequence[KnownImage], look: Look) -> FileCheck:
    """One expectation against ``stack``: ``want`` is an ``expect.files`` entry, or an
    ``expect.absent`` path. ``images`` are searched, in order, for a path missing here."""
    present = isinstance(want, ExpectedFile)
    path = want.path if isinstance(want, ExpectedFile) else want
    located = locate(stack.layers, path, look, follow=present)
    base = {
        "path": path,
        "expect": FileExpect.PRESENT if present else FileExpect.ABSENT,
        "sha256": want.sha256 if isinstance(want, ExpectedFile) else None,
        "mode": want.mode if isinstance(want, ExpectedFile) else None,
    }
    if isinstance(located, Unknown):
        return FileCheck(
            **base,
            verdict=FileVerdict.UNKNOWN,
            found=None,
            message=f"not known: {_layer_name(stack, located.layer)} could not be read: {located.why}",
        )
    if isinstance(located, Miss):
        hidden = (
            f", deleted by a whiteout in {_layer_name(stack, located.hidden_by)}"
            if located.hidden_by is not None
            else ""
        )
        if not present:
            return FileCheck(
                **base, verdict=FileVerdict.HOLDS, found=False, message=f"absent from {stack.label}{hidden}"
            )
        sources = _sources(path, images, look, present)
        elsewhere = "".join(
            f"; layer {s.layer} ({short_digest(s.layer_digest)}) of {s.image} provides it" for s in sources
        )
        return FileCheck(
            **base,
            verdict=FileVerdict.FAILS,
            found=False,
            provided_by=sources,
            message=f"missing from {stack.label}{hidden}{elsewhere}",
        )
    entry = located.entry
    where = _layer_name(stack, located.layer)
    via = f" (through symbolic links: {located.path})" if located.path != path else ""
    failures, unknowns = ([], []) if not isinstance(want, ExpectedFile) else _content_problems(want, located)
    if not present:
        failures = [f"a {entry.kind.value} is there"]
    verdict = FileVerdict.FAILS if failures else FileVerdict.UNKNOWN if unknowns else FileVerdict.HOLDS
    said = "; ".join(failures or unknowns)
    return FileCheck(
        **base,
        verdict=verdict,
        found=True,
        kind=entry.kind,
        resolved=located.path if via else None,
        layer=located.layer,
        layer_digest=stack.layers[located.layer],
        found_mode=f"{entry.mode:04o}",
        found_sha256=entry.sha256 if isinstance(want, ExpectedFile) and want.sha256 else None,
        message=f"in {where}{via}" + (f": {said}" if said else ""),
    )


def checks(
    expect: Expectations, stack: Stack, images: Sequence[KnownImage], look: Look
) -> tuple[FileCheck, ...]:
    """Every ``expect.files`` then ``expect.absent`` entry against ``stack``."""
    wanted: list[ExpectedFile | str] = [*expect.files, *expect.absent]
    return tuple(check(want, stack, images, look) for want in wanted)


def planned_layers(resolved: ResolvedVM) -> tuple[str, ...]:
    """The layer digests a VM is planned on, bottom first: a clone's cocoon.json layers, a
    run's image layers."""
    if resolved.snapshot is not None:
        configs = resolved.snapshot.meta.storage_configs
        return tuple(hex_to_digest(layer_hex(c)) or "" for c in configs if c.role is DiskRole.LAYER)
    return tuple(layer.digest for layer in resolved.image.layers) if resolved.image else ()


def running_layers(vm: ObservedVM) -> tuple[str, ...]:
    """The layer digests a VM on the node really has, bottom first."""
    return tuple(hex_to_digest(layer_hex(c)) or "" for c in vm.storage_configs if c.role is DiskRole.LAYER)


def planned_image(resolved: ResolvedVM) -> KnownImage | None:
    """The image the planned layers are: a clone's base image, a run's image."""
    image = resolved.snapshot.base_image if resolved.snapshot else resolved.image
    if image is None:
        return None
    return KnownImage(ref=image.pinned.ref, digest=image.pinned.digest, layers=planned_layers(resolved))


def vm_checks(
    loaded: LoadedSpec, resolved: ResolvedVM, vm: ObservedVM | None, images: Sequence[KnownImage], look: Look
) -> tuple[tuple[FileCheck, ...], tuple[FileCheck, ...]]:
    """(checks on the planned layers, checks on the layers of ``vm``, the VM on the node).

    A path missing from the planned layers is looked for in every other known image; one
    missing on the node first in the planned image, where it should have come from.
    """
    expect = loaded.spec.spec.expect
    if expect is None or not (expect.files or expect.absent):
        return (), ()
    layers = planned_layers(resolved)
    planned = planned_image(resolved)
    others = [image for image in images if image.layers != layers]
    ours = checks(expect, Stack(layers, f"its {len(layers)} planned layers"), others, look)
    if vm is None:
        return ours, ()
    have = running_layers(vm)
    sources: dict[str, KnownImage] = {}
    for image in ([planned] if planned else []) + list(images):
        if image.layers != have:
            sources.setdefault(image.digest, image)
    stack = Stack(have, f"the {len(have)} layers it runs on")
    return ours, checks(expect, stack, list(sources.values()), look)


def evidence_look(evidence: FileEvidence) -> Look:
    """A :data:`Look` answering from what the resolver recorded."""

    def look(digest: str, path: str) -> LayerEntry | None:
        layer = evidence.layers.get(digest)
        if layer is None:
            raise UnreadError("it was not read")
        if layer.unreadable is not None:
            raise UnreadError(layer.unreadable)
        if path not in layer.entries:
            raise UnreadError(f"{path} was not looked up in it")
        return layer.entries[path]

    return look


def _recorded(
    resolved: ResolvedVM, vm: ObservedVM | None, loaded: LoadedSpec
) -> tuple[tuple[FileCheck, ...], tuple[FileCheck, ...]]:
    evidence = resolved.files
    if evidence is None:
        return (), ()
    return vm_checks(loaded, resolved, vm, evidence.images, evidence_look(evidence))


def planned_files(loaded: LoadedSpec, resolved: ResolvedVM) -> tuple[FileCheck, ...]:
    """The spec's file expectations on its planned layers; raises FileExpectationError naming
    every path that fails (an unknown answer is no failure)."""
    ours, _ = _recorded(resolved, None, loaded)
    failed = [c for c in ours if c.verdict is FileVerdict.FAILS]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        said = (
            f"{first.path} (expected absent)"
            if first.expect is FileExpect.ABSENT
            else f"expected file {first.path}"
        )
        raise FileExpectationError(
            f"VM {loaded.spec.name}: {said}: {first.message}{more}",
            detail="\n".join(f"  {c.path}: {c.message}" for c in failed) if len(failed) > 1 else "",
            hint=f"build the file into the image, or correct expect.files/expect.absent in {loaded.file}; "
            "cocoonplan never plans a VM whose root lacks what its spec expects",
        )
    return ours


def file_drift(loaded: LoadedSpec, resolved: ResolvedVM, vm: ObservedVM) -> tuple[FileCheck, ...]:
    """The spec's file expectations that fail on the layers ``vm`` (on the node) really has."""
    _, theirs = _recorded(resolved, vm, loaded)
    return tuple(c for c in theirs if c.verdict is FileVerdict.FAILS)
