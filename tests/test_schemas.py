"""schemas/*.json are generated from the models, and the shipped documents validate against them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from clirunner import EXAMPLES, copy_examples, run_cli
from cocoonplan.schemas import generate

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@pytest.mark.parametrize("name", sorted(generate()))
def test_committed_schema_is_current(name: str) -> None:
    committed = SCHEMAS / name
    assert committed.is_file(), f"run `cocoonplan schemas --dir schemas` to write {name}"
    assert committed.read_text() == generate()[name], (
        f"{name} is stale: run `cocoonplan schemas --dir schemas`"
    )


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    "spec", sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name != "cocoonplan.yaml")
)
def test_example_specs_validate_against_the_spec_schema(spec: str) -> None:
    validator = _validator("vmspec.schema.json")
    for document in yaml.safe_load_all((EXAMPLES / spec).read_text()):
        assert list(validator.iter_errors(document)) == []


def test_spec_schema_refuses_unknown_fields() -> None:
    document = yaml.safe_load((EXAMPLES / "agent-run.yaml").read_text())
    document["spec"]["memroy"] = "1G"
    assert not _validator("vmspec.schema.json").is_valid(document)


def test_project_and_lock_validate() -> None:
    assert _validator("project.schema.json").is_valid(
        yaml.safe_load((EXAMPLES / "cocoonplan.yaml").read_text())
    )
    assert _validator("lock.schema.json").is_valid(json.loads((EXAMPLES / "cocoonplan.lock").read_text()))


def test_plan_document_validates_against_the_plan_schema(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples")
    document = json.loads(run_cli(["plan", ".", "--json"], project).stdout)
    assert list(_validator("plan.schema.json").iter_errors(document)) == []
