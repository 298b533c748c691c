"""The plan as a versioned JSON document: the only input of every renderer.

The JSON text is written by pydantic-core's encoder (Rust), which gives the bytes Python's
``json.dumps(indent=2, ensure_ascii=False)`` gives at a fraction of the time, and a large
plan is written VM by VM (:func:`json_chunks`) so that it never exists twice in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic_core import to_json

from cocoonplan.planner.model import Plan


def plan_document(plan: Plan) -> dict[str, Any]:
    """The plan's JSON form: ``format_version``, ``vms[]``, ``lock_changes[]``, ``errors[]``, ``summary``."""
    return plan.model_dump(mode="json", by_alias=True)


def _encoded(value: Any, depth: int = 0) -> str:
    """``value`` as indented JSON, to stand ``depth`` levels deep (a JSON string holds no raw
    line break, so every line break is the encoder's own)."""
    return to_json(value, indent=2).decode().replace("\n", "\n" + "  " * depth)


def render_json(document: dict[str, Any]) -> str:
    """Indented JSON with a trailing newline; key order as the models declare it."""
    return _encoded(document) + "\n"


def json_chunks(plan: Plan) -> Iterator[str]:
    """:func:`render_json` of the plan's document, one VM at a time."""
    rest = plan.model_dump(mode="json", by_alias=True, exclude={"vms"})
    fields = type(plan).model_fields
    keys = [f.serialization_alias or f.alias or name for name, f in fields.items()]
    keys = [key for key in keys if key == "vms" or key in rest]
    yield "{"
    for number, key in enumerate(keys):
        yield f"{',' if number else ''}\n  {_encoded(key)}: "
        if key != "vms":
            yield _encoded(rest[key], 1)
        elif not plan.vms:
            yield "[]"
        else:
            for at, vm in enumerate(plan.vms):
                text = vm.model_dump_json(indent=2, by_alias=True).replace("\n", "\n    ")
                yield ("[\n    " if at == 0 else ",\n    ") + text
            yield "\n  ]"
    yield "\n}\n"
