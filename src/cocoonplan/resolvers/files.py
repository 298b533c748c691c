"""What file expectations need from the layers, gathered before planning.

For every spec with ``expect.files`` or ``expect.absent``, the planner's own checks
(:func:`cocoonplan.planner.files.vm_checks`) run here against the real layers, and every lookup
they make is recorded; the planner runs them again over the record
(:class:`~cocoonplan.resolved.FileEvidence`), so it decides from exactly what was read. A layer's
tree is read once per plan, whichever VMs and images share it, from, in order:

1. its OCI blob, when a resolved image names it, verified against its digest as it streams:
   from the blob cache, else from its source (an OCI layout, or a registry, downloaded into
   the cache), through :class:`~cocoonplan.resolvers.layerscan.LayerScanner`;
2. its EROFS image on a node root readable from here (``oci/blobs/<hex>.erofs``), opened
   through :mod:`cocoonplan.nodefs` and read by :mod:`cocoonplan.resolvers.erofs`.

A layer that neither gives is unreadable, with the reasons: every check whose answer depends on
it is unknown, never failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from cocoonplan.errors import CocoonplanError
from cocoonplan.model import DIGEST_PATTERN, digest_hex
from cocoonplan.nodefs import Tree
from cocoonplan.observed import NodeState
from cocoonplan.oci.manifest import Descriptor
from cocoonplan.oci.reference import parse_reference
from cocoonplan.planner import PlanInput
from cocoonplan.planner.files import UnreadError, vm_checks
from cocoonplan.resolved import BlobRef, FileEvidence, KnownImage, LayerEntry, LayerFiles, ResolvedImage
from cocoonplan.resolvers.erofs import ErofsImage
from cocoonplan.resolvers.layerscan import LayerScanner, TreeEntry
from cocoonplan.resolvers.node import BLOBS_DIR

_Tree = Mapping[str, TreeEntry] | ErofsImage
_DIGEST = re.compile(DIGEST_PATTERN)


class LayerTrees:
    """Layer trees by digest, each read once, with every lookup made in them recorded."""

    def __init__(
        self, scanner: LayerScanner, blobs: Mapping[str, BlobRef], roots: Mapping[str, Path]
    ) -> None:
        self._scanner = scanner
        self._blobs = blobs
        self._roots = roots
        self._opened = ExitStack()
        self._nodes: dict[str, Tree] | None = None
        self._trees: dict[str, _Tree | str] = {}
        self._recorded: dict[str, dict[str, LayerEntry | None]] = {}

    def __enter__(self) -> LayerTrees:
        return self

    def __exit__(self, *_: object) -> None:
        self._opened.close()

    def look(self, digest: str, path: str) -> LayerEntry | None:
        """The layer's own entry at ``path`` (recorded); UnreadError when its tree cannot be read."""
        if not _DIGEST.fullmatch(digest):
            # A snapshot whose cocoon.json names no blob: its plan fails on that, not here.
            raise UnreadError(f"{digest!r} names no layer blob")
        tree = self._tree(digest)
        if isinstance(tree, str):
            raise UnreadError(tree)
        try:
            if isinstance(tree, ErofsImage):
                entry = tree.entry(path)
            else:
                found = tree.get(path)
                entry = None if found is None else found.entry()
        except CocoonplanError as exc:
            # A damaged image: nothing read from it before counts either.
            self._trees[digest] = exc.summary
            self._recorded.pop(digest, None)
            raise UnreadError(exc.summary) from exc
        self._recorded.setdefault(digest, {})[path] = entry
        return entry

    def recorded(self) -> dict[str, LayerFiles]:
        """Every layer looked at, with the paths looked up in it or why it could not be read."""
        return {
            digest: LayerFiles(digest=digest, unreadable=tree)
            if isinstance(tree, str)
            else LayerFiles(digest=digest, entries=self._recorded.get(digest, {}))
            for digest, tree in sorted(self._trees.items())
        }

    def _tree(self, digest: str) -> _Tree | str:
        if digest not in self._trees:
            self._trees[digest] = self._read(digest)
        return self._trees[digest]

    def _read(self, digest: str) -> _Tree | str:
        reasons = []
        blob = self._blobs.get(digest)
        if blob is None:
            reasons.append("no image resolved for this plan names its blob")
        else:
            descriptor = Descriptor(mediaType=blob.media_type, digest=blob.digest, size=blob.size)
            try:
                entries = self._scanner.scan(parse_reference(blob.source), descriptor).entries
            except CocoonplanError as exc:
                reasons.append(f"its blob: {exc.summary}")
            else:
                assert entries is not None  # the scanner keeps trees whenever files are expected
                return entries
        rel = f"{BLOBS_DIR}/{digest_hex(digest)}.erofs"
        damaged = False
        for name, node in self._node_trees().items():
            try:
                file = self._opened.enter_context(node.open_file(rel))
                if file is not None:
                    return ErofsImage(file, f"EROFS layer {rel} of node {name}")
            except CocoonplanError as exc:
                reasons.append(exc.summary)
                damaged = True
        if not damaged:
            reasons.append(
                f"no node root readable from here holds {rel}"
                if self._roots
                else "no node root is readable from here (a state document holds no layers)"
            )
        return "; ".join(reasons)

    def _node_trees(self) -> dict[str, Tree]:
        if self._nodes is None:
            self._nodes = {}
            for name, root in sorted(self._roots.items()):
                try:
                    self._nodes[name] = self._opened.enter_context(
                        Tree.open(root, "cocoon root dir", f"copy node {name}'s cocoon root dir again")
                    )
                except CocoonplanError:
                    continue  # read as the node's state already; an error there was reported then
        return self._nodes


def _known(image: ResolvedImage) -> KnownImage:
    return KnownImage(
        ref=image.pinned.ref, digest=image.pinned.digest, layers=tuple(b.digest for b in image.layers)
    )


def _resolved_images(inputs: Sequence[PlanInput]) -> list[ResolvedImage]:
    found = []
    for item in inputs:
        resolved = item.resolved
        snapshot = resolved.snapshot
        found += [
            i for i in (resolved.image, snapshot.base_image if snapshot else None, resolved.base_boot) if i
        ]
    return found


def known_images(
    inputs: Sequence[PlanInput], states: Mapping[str, NodeState | None]
) -> tuple[KnownImage, ...]:
    """Every image this plan knows, once per manifest digest: those resolved for specs, then
    those on the nodes (images.json), each group by reference."""
    resolved = sorted((_known(i) for i in _resolved_images(inputs)), key=lambda i: (i.ref, i.digest))
    on_nodes = sorted(
        (
            KnownImage(ref=image.ref, digest=image.manifest_digest, layers=image.layers)
            for state in states.values()
            if state is not None
            for image in state.images
        ),
        key=lambda i: (i.ref, i.digest),
    )
    unique: dict[str, KnownImage] = {}
    for image in (*resolved, *on_nodes):
        unique.setdefault(image.digest, image)
    return tuple(unique.values())


def expects_files(item: PlanInput) -> bool:
    """Whether the spec names any path in ``expect.files`` or ``expect.absent``."""
    expect = item.loaded.spec.spec.expect
    return expect is not None and bool(expect.files or expect.absent)


def gather_files(
    inputs: Sequence[PlanInput],
    states: Mapping[str, NodeState | None],
    scanner: LayerScanner,
    roots: Mapping[str, Path],
) -> list[PlanInput]:
    """``inputs`` with the evidence their file checks need attached (``resolved.files``).

    ``scanner`` reads OCI layer blobs (it must keep trees); ``roots`` are the local node roots
    whose EROFS layers may be read, by node name.
    """
    expecting = [item for item in inputs if expects_files(item)]
    if not expecting:
        return list(inputs)
    images = known_images(inputs, states)
    blobs = {blob.digest: blob for image in _resolved_images(inputs) for blob in image.layers}
    with LayerTrees(scanner, blobs, roots) as trees:
        for item in expecting:
            state = states.get(item.loaded.spec.spec.node)
            vm = state.vm_named(item.loaded.spec.name) if state else None
            vm_checks(item.loaded, item.resolved, vm, images, trees.look)
        evidence = FileEvidence(layers=trees.recorded(), images=images)
    return [
        item.model_copy(update={"resolved": item.resolved.model_copy(update={"files": evidence})})
        if expects_files(item)
        else item
        for item in inputs
    ]
