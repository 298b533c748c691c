"""The lock file, ``cocoonplan.lock``: every reference resolved once, pinned by digest.

It sits beside the project file and is committed. Each entry records what was asked
(``original``, as written in a spec) and what it resolved to (``locked``): the manifest
digest and, for a snapshot, the digest of the image it was baked from.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from cocoonplan.errors import SpecError
from cocoonplan.model import Digest, Model


class RefKind(StrEnum):
    """What a locked reference names."""

    SNAPSHOT = "snapshot"
    IMAGE = "image"


class LockedDigests(Model):
    """What a reference resolved to."""

    digest: Digest
    """The (platform) manifest digest."""
    base_image_digest: Digest | None = None
    """For a snapshot: the image digest its config blob records."""


class LockEntry(Model):
    """One reference as written, and its pin."""

    original: str
    kind: RefKind
    locked: LockedDigests


class LockFile(Model):
    """The whole lock file; entries sorted by ``original``."""

    format_version: Literal[1] = 1
    references: tuple[LockEntry, ...] = ()

    def find(self, original: str) -> LockEntry | None:
        """The entry for a reference as written, if locked."""
        return next((e for e in self.references if e.original == original), None)


def read_lock(path: Path, display: str) -> LockFile:
    """Read the lock file; a missing file is an empty lock, a malformed one a SpecError."""
    if not path.exists():
        return LockFile()
    try:
        return LockFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise SpecError(
            f"lock file is not valid: {exc}",
            file=display,
            hint="restore it from version control, or delete it and run `cocoonplan lock`",
        ) from exc


def encode_lock(lock: LockFile) -> str:
    """The lock file's text: indented JSON with sorted entries, stable for diffs."""
    ordered = lock.model_copy(update={"references": tuple(sorted(lock.references, key=lambda e: e.original))})
    return json.dumps(ordered.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"
