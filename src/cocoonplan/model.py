"""The shared base of every phase model, and the digest type every decision rests on.

Each phase (spec, resolved, observed, plan) has its own models; all of them derive from
:class:`Model`, which is frozen and refuses unknown fields, so a typo in a document is an
error instead of a silently ignored key.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$"
"""cocoon's VM name syntax; node names follow it too, so names are safe as path components."""

Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]
"""A content digest, always ``sha256:<64 lower-case hex>``; tags never stand in for one."""


class Mode(StrEnum):
    """How a VM comes to be: cloned from a hot snapshot, or booted fresh from an image.

    Shared by the plan and by cocoonplan's ownership records on the node.
    """

    CLONE = "clone"
    RUN = "run"


class Model(BaseModel):
    """Frozen, closed pydantic base: unknown fields are errors, instances never change."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` deterministically (sorted keys, no spaces) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """Return the 64-character hex of a ``sha256:`` digest (cocoon names blobs by it)."""
    return digest.removeprefix("sha256:")


def hex_to_digest(hex_: str | None) -> str | None:
    """``sha256:<hex>`` for a layer hex, None for none."""
    return f"sha256:{hex_}" if hex_ else None


def short_digest(digest: str) -> str:
    """Return a 12-hex abbreviation for human output; JSON always carries the full digest."""
    return digest_hex(digest)[:12]
