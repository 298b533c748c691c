"""The plan as a versioned JSON document: the only input of every renderer."""

from __future__ import annotations

import json
from typing import Any

from cocoonplan.planner.model import Plan


def plan_document(plan: Plan) -> dict[str, Any]:
    """The plan's JSON form: ``format_version``, ``vms[]``, ``lock_changes[]``, ``errors[]``, ``summary``."""
    return plan.model_dump(mode="json", by_alias=True)


def render_json(document: dict[str, Any]) -> str:
    """Indented JSON with a trailing newline; key order as the models declare it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
