"""What a node already holds, as far as planning needs it: the layer blobs it has converted."""

from __future__ import annotations

import re
from pathlib import Path

_ERofs = re.compile(r"^([0-9a-f]{64})\.erofs$")


def present_layers(state_dir: Path | None) -> frozenset[str]:
    """Hexes of the layers whose EROFS conversion exists under a cocoon root directory.

    A node without readable state holds nothing: every blob is then planned for fetching.
    """
    if state_dir is None:
        return frozenset()
    blobs = state_dir / "oci" / "blobs"
    if not blobs.is_dir():
        return frozenset()
    return frozenset(m.group(1) for p in blobs.iterdir() if (m := _ERofs.match(p.name)) and p.is_file())
