"""Resolved inputs: everything the planner decides on, pinned by digest.

Resolvers produce these from registries, layouts and lock files; the planner consumes them
and never looks anything up itself. Tags survive only as labels beside their digests.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from cocoonplan.cocoon import SnapshotConfig, SnapshotMeta
from cocoonplan.model import Digest, Model
from cocoonplan.observed import NodeState
from cocoonplan.project import NodeConfig
from cocoonplan.releases import CocoonVersion


class BlobRef(Model):
    """A blob named by a manifest: what to fetch, how big, from which repository."""

    digest: Digest
    size: int = Field(ge=0)
    media_type: str
    source: str
    """The canonical repository it is fetched from (``ghcr.io/cocoonstack/cocoon/ubuntu``)."""
    title: str | None = None
    """The file name a snapshot layer carries (``cow.raw``); None for image layers."""


class PinnedRef(Model):
    """A reference as written, beside the digest it was resolved (or locked) to."""

    ref: str
    """As written in the spec, tag included: a label only."""
    digest: Digest
    """The manifest digest every decision rests on."""


class ResolvedImage(Model):
    """An OCI image, resolved to its platform manifest and layers."""

    pinned: PinnedRef
    repository: str
    layers: tuple[BlobRef, ...]
    """In manifest order, bottom first: ``cocoon-layer0`` is ``layers[0]``."""
    kernel_layer: Digest | None = None
    """The last layer holding ``boot/vmlinuz*`` (as cocoon scans); None when not scanned."""
    initrd_layer: Digest | None = None
    """The last layer holding ``boot/initrd.img*``; None when not scanned."""


class ResolvedSnapshot(Model):
    """A cocoon hot-snapshot artifact with the files the plan is built from."""

    pinned: PinnedRef
    repository: str
    artifact_type: str | None
    annotations: dict[str, str]
    config: SnapshotConfig
    """The artifact's config blob."""
    config_blob: BlobRef
    """Where the config blob is, for apply to fetch it by digest."""
    files: tuple[BlobRef, ...]
    """Every file of the artifact (cocoon.json, config.json, cow.raw, …) in manifest order."""
    meta: SnapshotMeta
    """``cocoon.json``: the authoritative disk list."""
    ch_config: dict[str, Any]
    """``config.json`` exactly as stored (key order kept): the Cloud Hypervisor VmConfig."""
    base_image: ResolvedImage | None
    """The base image fetched by the config blob's ``imageDigest`` (never by tag)."""


class EntryKind(StrEnum):
    """What a path is in a layer or a merged root; values are the wire strings."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    WHITEOUT = "whiteout"
    """Hides the path in every lower layer (OCI ``.wh.NAME``; overlay's 0:0 character device)."""
    OTHER = "other"
    """A device, FIFO or socket."""


class LayerEntry(Model):
    """One path as a single layer holds it."""

    kind: EntryKind
    mode: int = Field(default=0, ge=0, le=0o7777)
    """Permission bits with set-id and sticky bits (no file type)."""
    opaque: bool = False
    """Directories: the lower layers' entries below it are hidden (``.wh..wh..opq``)."""
    target: str | None = None
    """Symbolic links: the target as written."""
    sha256: str | None = None
    """Regular files: the hex sha256 of the content, when it was read."""


class LayerFiles(Model):
    """What a plan learnt of one layer's tree: the paths the file checks looked up in it."""

    digest: Digest
    entries: dict[str, LayerEntry | None] = Field(default_factory=dict)
    """By absolute guest path: the layer's entry, or None when the layer holds nothing there."""
    unreadable: str | None = None
    """Why the layer's content could not be read (then ``entries`` is empty); None when it was."""


class KnownImage(Model):
    """An image a missing file may be found in: on a node (images.json) or resolved for a spec."""

    ref: str
    """A label: the reference it was resolved or pulled by."""
    digest: Digest
    """Its (platform) manifest digest."""
    layers: tuple[Digest, ...]
    """Bottom first."""


class FileEvidence(Model):
    """What the file checks of a plan read, shared by every VM that expects files."""

    layers: dict[str, LayerFiles]
    """By layer digest."""
    images: tuple[KnownImage, ...]
    """Every image known to this plan, by reference: where a missing file is looked for."""


class ResolvedVM(Model):
    """Everything one VM spec resolved to: its source, and the expected base if the spec set one."""

    image: ResolvedImage | None = None
    """Run mode: the image to boot."""
    snapshot: ResolvedSnapshot | None = None
    """Clone mode: the snapshot to clone."""
    expected_base: PinnedRef | None = None
    """``expect.baseImage``, resolved to a manifest digest through the lock."""
    present_blobs: frozenset[str] = frozenset()
    """Layer hexes whose EROFS conversion already exists on the node."""
    base_boot: ResolvedImage | None = None
    """Clone mode, when the node lacks the snapshot's kernel or initrd: its base image with
    the layers cocoon would extract them from."""
    files: FileEvidence | None = None
    """What the layers hold at the paths ``expect.files``/``expect.absent`` name; None when the
    spec expects none."""


class RunningBase(Model):
    """The image a VM on the node was made from (its record's ``image_digest``), with its layers."""

    ref: str
    """The image reference the VM record names: a label."""
    digest: Digest
    layers: tuple[Digest, ...]
    """Bottom first: what ``cocoon-layer0..N`` of the VM must be."""


class NodeView(Model):
    """One node as the planner sees it."""

    name: str
    settings: NodeConfig
    """The node as the project file declares it."""
    state: NodeState | None
    """None when the node's state is not known: nothing can be decided about its VMs."""
    bases: dict[str, RunningBase] = Field(default_factory=dict)
    """By VM ID: the base each running VM must be on; a VM missing here cannot be checked for layer drift."""
    cocoon: CocoonVersion | None = None
    """The node's cocoon release and planning line; None when neither set nor known from its state."""
    default_network: str | None = None
    """The network cocoon records for a VM given no ``--network`` on this node; None when unknown."""
