"""Test support for the boot proof (the proof itself is ``cocoonplan.proof``): whether this
machine can boot a guest, and the independent oracle of what a layer stack's root holds."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cocoonplan.proof.host import KERNEL_ROOT_VARIABLE, missing_prerequisites
from needs import unavailable
from ocifixture import Blob, files_of


def require_kernel_root() -> Path:
    """The kernel root the boot tests use; without one (or a tool) they skip on a developer
    machine and fail under CI, which must run them (scripts/test provides everything)."""
    root = os.environ.get(KERNEL_ROOT_VARIABLE)
    missing = missing_prerequisites(Path(root) if root else None)
    if missing:
        unavailable("boot proof needs " + "; ".join(missing))
    return Path(str(root))


def merged_tree(layers_bottom_first: Sequence[Blob]) -> dict[str, str]:
    """The regular files an overlay of these layers must show: path -> sha256 hex.

    Computed from the layer tars alone, never from anything cocoonplan produced. Layers are
    applied bottom to top, so the top-most copy of a repeated path wins. The model has no
    whiteouts (OCI ``.wh.`` entries), so it refuses layers that carry any.
    """
    merged: dict[str, str] = {}
    for blob in layers_bottom_first:
        for name, data in files_of(blob).items():
            if Path(name).name.startswith(".wh."):
                raise ValueError(f"layer {blob.digest} has whiteout {name}: merged_tree does not model it")
            merged[name] = hashlib.sha256(data).hexdigest()
    return merged
