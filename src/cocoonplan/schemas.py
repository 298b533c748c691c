"""JSON Schemas generated from the models: the contract for editors and ``--json`` consumers.

``schemas/*.json`` in the repository are these, committed; a test fails when they are stale.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from cocoonplan.lock import LockFile
from cocoonplan.observed import NodeState
from cocoonplan.planner.model import Plan
from cocoonplan.project import Project
from cocoonplan.spec import VMSpec

DIALECT = "https://json-schema.org/draft/2020-12/schema"
_MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "vmspec.schema.json": (VMSpec, "validation"),
    "project.schema.json": (Project, "validation"),
    "lock.schema.json": (LockFile, "validation"),
    "plan.schema.json": (Plan, "serialization"),
    "state.schema.json": (NodeState, "validation"),
}


def generate() -> dict[str, str]:
    """Every schema file's text, by file name."""
    out = {}
    for name, (model, mode) in _MODELS.items():
        schema: dict[str, Any] = {"$schema": DIALECT, "$id": f"https://cocoonplan.dev/schemas/{name}"}
        schema |= model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[arg-type]
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out
