"""Reading VM specs from YAML files: validation located at file:line:column, unique names."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from pydantic import ValidationError

from cocoonplan.document import LocatedDocument, read_documents
from cocoonplan.errors import SpecError
from cocoonplan.spec import VM_KIND, LoadedSpec, VMSpec


def validate_document(document: LocatedDocument) -> VMSpec:
    """Validate one located document as a VM spec, raising a located SpecError."""
    try:
        return VMSpec.model_validate(document.data)
    except ValidationError as exc:
        raise document.validation_error(exc) from exc


def is_vm_document(document: LocatedDocument) -> bool:
    """Whether a document declares ``kind: VM`` (other kinds in a repo are skipped)."""
    return isinstance(document.data, dict) and document.data.get("kind") == VM_KIND


def load_specs(path: Path, display: str, nodes: Collection[str]) -> list[LoadedSpec]:
    """Load every ``kind: VM`` document of a YAML file, validated; errors name file:line:column.

    ``nodes`` are the node names the project file declares; a spec naming another is an error.
    """
    loaded = []
    for document in read_documents(path, display):
        if not isinstance(document.data, dict):
            raise document.error((), "a document must be a mapping with apiVersion, kind, metadata and spec")
        if not is_vm_document(document):
            continue
        spec = validate_document(document)
        if spec.spec.node not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise document.error(
                ("spec", "node"),
                f"spec.node: unknown node {spec.spec.node!r} (the project file declares: {known})",
                hint="add the node under `nodes:` in cocoonplan.yaml",
            )
        loaded.append(LoadedSpec(spec=spec, file=display, line=document.start[0]))
    return loaded


def check_unique(specs: list[LoadedSpec]) -> None:
    """Refuse two specs naming the same VM on the same node."""
    seen: dict[tuple[str, str], LoadedSpec] = {}
    for item in specs:
        key = (item.spec.spec.node, item.spec.name)
        if key in seen:
            first = seen[key]
            raise SpecError(
                f"VM {item.spec.name!r} on node {key[0]!r} is also defined at {first.file}:{first.line}",
                file=item.file,
                line=item.line,
                hint="VM names must be unique per node",
            )
        seen[key] = item
