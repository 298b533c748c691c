"""Resolved inputs: everything the planner decides on, pinned by digest.

Resolvers produce these from registries, layouts and lock files; the planner consumes them
and never looks anything up itself. Tags survive only as labels beside their digests.
"""

from __future__ import annotations

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
