"""Validate generated config.json documents against the Cloud Hypervisor v51 OpenAPI schema.

The schema is ``data/cloud-hypervisor-v51.0-openapi.yaml``, a verbatim copy of the one in
``shared/reference/`` (taken from the cloud-hypervisor repository, Apache-2.0), kept here so
a clone tests on its own; a test checks the copy against shared/ where that exists. OpenAPI 3.0 component
schemas are turned into one JSON Schema (draft 2020-12); CH serialises ``None`` as ``null``,
which OpenAPI 3.0 spells as an absent key, so nulls are dropped before validation.
"""

from __future__ import annotations

import ast
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
OPENAPI = "cloud-hypervisor-v51.0-openapi.yaml"


SCHEMA = Path(__file__).resolve().parent / "data" / OPENAPI


def shared_reference() -> Path:
    """Where the shared reference material lives (beside the repository)."""
    return Path(os.environ.get("COCOONPLAN_REFERENCE", REPO.parent / "shared" / "reference"))


def _convert(node: Any) -> Any:
    if isinstance(node, dict):
        out = {key: _convert(value) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            out["$ref"] = ref.replace("#/components/schemas/", "#/$defs/")
        kind = out.get("type")
        # The v51 schema writes DiskConfig.image_type as `type: enum [...]`: read it as an enum.
        if isinstance(kind, str) and kind.startswith("enum "):
            del out["type"]
            out["enum"] = ast.literal_eval(kind.removeprefix("enum ").strip())
        return out
    if isinstance(node, list):
        return [_convert(item) for item in node]
    return node


@cache
def vm_config_validator() -> jsonschema.Draft202012Validator:
    """A validator for the VmConfig schema (the body of vm.create, the shape of config.json)."""
    spec = yaml.safe_load(SCHEMA.read_text())
    defs = _convert(spec["components"]["schemas"])
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": defs,
        "$ref": "#/$defs/VmConfig",
    }
    return jsonschema.Draft202012Validator(schema)


def drop_nulls(value: Any) -> Any:
    """Remove null members recursively (CH's ``None``)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def config_errors(config: dict[str, Any]) -> list[str]:
    """Schema violations of a config.json, as readable lines (empty when valid)."""
    validator = vm_config_validator()
    return sorted(
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(drop_nulls(config))
    )


def unknown_keys(config: dict[str, Any]) -> list[str]:
    """Keys of config.json that the v51 schema does not define (typos would show here)."""
    defs = _convert(yaml.safe_load(SCHEMA.read_text())["components"]["schemas"])

    def walk(value: Any, schema: dict[str, Any], path: str) -> list[str]:
        while "$ref" in schema:
            schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
        found = []
        if isinstance(value, dict) and "properties" in schema:
            for key, item in value.items():
                if key not in schema["properties"]:
                    found.append(f"{path}/{key}")
                else:
                    found += walk(item, schema["properties"][key], f"{path}/{key}")
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                found += walk(item, schema["items"], f"{path}/{i}")
        return found

    return walk(config, {"$ref": "#/$defs/VmConfig"}, "")


@cache
def _component_validator(component: str) -> jsonschema.Draft202012Validator:
    spec = yaml.safe_load(SCHEMA.read_text())
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": _convert(spec["components"]["schemas"]),
        "$ref": f"#/$defs/{component}",
    }
    return jsonschema.Draft202012Validator(schema)


def request_errors(component: str, body: dict[str, Any]) -> list[str]:
    """Violations of a REST request body against one component schema (``NetConfig``,
    ``RestoreConfig``, …), keys the schema does not define included."""
    defined = yaml.safe_load(SCHEMA.read_text())["components"]["schemas"][component].get("properties", {})
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in _component_validator(component).iter_errors(drop_nulls(body))
    ]
    return sorted(errors + [f"{key}: not defined by {component}" for key in body if key not in defined])
