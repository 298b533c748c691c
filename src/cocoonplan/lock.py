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

from cocoonplan.atomic import ReadError, read_bounded
from cocoonplan.bounded import InputLimitError
from cocoonplan.errors import CocoonplanError, SpecError
from cocoonplan.model import Digest, Model

MAX_LOCK_BYTES = 4 << 20
"""Largest lock file read: a few hundred bytes a reference."""


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
    """Read the lock file; a missing file is an empty lock, a malformed one a SpecError.

    pydantic's JSON parser bounds nesting (about 200 levels, without recursing in Python) and
    the digits of numbers itself; the size is bounded here. The file is read as every
    repository file is (:func:`cocoonplan.atomic.read_bounded`): a link, FIFO or device there
    is refused, never followed or waited on."""
    try:
        content = read_bounded(path.parent, path.name, MAX_LOCK_BYTES)
    except ReadError as exc:
        raise CocoonplanError(exc.about(display), hint=exc.hint) from exc
    if content is None:
        return LockFile()
    try:
        if len(content) > MAX_LOCK_BYTES:
            raise InputLimitError(f"larger than {MAX_LOCK_BYTES} bytes")
        return LockFile.model_validate_json(content)
    except (InputLimitError, ValidationError) as exc:
        # pydantic's own text spans lines and quotes the input: one line of field: problem.
        problem = (
            "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
            )
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise SpecError(
            f"lock file is not valid: {problem}",
            file=display,
            hint="restore it from version control, or delete it and run `cocoonplan lock`",
        ) from exc


def encode_lock(lock: LockFile) -> str:
    """The lock file's text: indented JSON with sorted entries, stable for diffs."""
    ordered = lock.model_copy(update={"references": tuple(sorted(lock.references, key=lambda e: e.original))})
    return json.dumps(ordered.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"
