"""The tar ``cocoon snapshot import`` reads, rebuilt from a verified snapshot artifact.

As epoch's puller does (§7.4 of the reference): the first entry is a ``snapshot.json``
envelope (``{"config": …, "version": 1}``, two-space indented, mode 0644) made from the
artifact's config blob under the local name, then every file of the artifact under its
title, name-sorted as cocoon's export writes them. A file the config blob lists with a
sparse map keeps it: its blob holds only the data segments, and the ``COCOON.sparse.map`` /
``COCOON.sparse.size`` PAX records tell cocoon's extractor where the holes go (§6.5).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from cocoonplan.cocoon import SnapshotConfig
from cocoonplan.errors import ApplyError

ENVELOPE = "snapshot.json"
DEFAULT_MODE = 0o640
"""What the puller gives a file whose mode the config blob omits (§7.3)."""


def envelope(config: SnapshotConfig, name: str) -> bytes:
    """``snapshot.json`` for ``config`` under the local snapshot ``name``, in cocoon's field order."""
    fields: list[tuple[str, Any]] = [
        ("cpu", config.cpu),
        ("memory", config.memory),
        ("storage", config.storage),
        ("image", config.image),
        ("image_digest", config.image_digest),
        ("image_type", config.image_type),
        ("network", config.network),
        ("windows", config.windows),
        ("id", config.snapshot_id),
        ("name", name),
        ("description", config.description),
        ("image_blob_ids", {hex_: {} for hex_ in sorted(config.image_blob_ids)}),
        ("hypervisor", config.hypervisor),
        ("nics", config.nics),
    ]
    # Go's omitempty: zero values are left out, except the name, which is always written.
    record = {key: value for key, value in fields if value or key == "name"}
    return (json.dumps({"config": record, "version": 1}, indent=2) + "\n").encode()


def _member(title: str, size: int, config: SnapshotConfig) -> tarfile.TarInfo:
    info = tarfile.TarInfo(title)
    info.size = size
    described = config.files.get(title)
    info.mode = described.mode if described and described.mode else DEFAULT_MODE
    if described and described.sparse_map is not None:
        info.pax_headers = {
            "COCOON.sparse.map": described.sparse_map,
            "COCOON.sparse.size": str(described.sparse_size or 0),
        }
    return info


def write_import_tar(out: IO[bytes], config: SnapshotConfig, name: str, files: Mapping[str, Path]) -> None:
    """Stream the import tar of a snapshot to ``out``: its config, local ``name`` and verified
    files (title -> local path). A file the config lists but ``files`` lacks is an ApplyError."""
    missing = sorted(set(config.files) - set(files))
    if missing:
        raise ApplyError(
            f"snapshot {config.snapshot_id}: files {', '.join(missing)} were not fetched",
            hint="apply fetches every file of the artifact first; plan and apply again",
        )
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        head = envelope(config, name)
        info = tarfile.TarInfo(ENVELOPE)
        info.size = len(head)
        info.mode = 0o644
        archive.addfile(info, io.BytesIO(head))
        for title in sorted(files):
            path = files[title]
            with path.open("rb") as data:
                archive.addfile(_member(title, path.stat().st_size, config), data)
