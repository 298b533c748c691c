"""Reading VM specs from YAML files: validation located at file:line:column, unique names."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cocoonplan.bounded import YAMLLimitError, load_yaml
from cocoonplan.document import (
    YAML_BOUNDS,
    LocatedDocument,
    limit_error,
    parsed_text,
    read_documents,
    read_yaml,
)
from cocoonplan.errors import CocoonplanError, SpecError
from cocoonplan.project import PROJECT_FILE
from cocoonplan.spec import VM_KIND, LoadedSpec, VMSpec

SPEC_SUFFIXES = (".yaml", ".yml")
API_GROUP = "cocoonplan/"
"""The prefix of every apiVersion cocoonplan defines; a document under it is cocoonplan's to judge."""
PROJECT_KIND = "Project"
KNOWN_KINDS = (VM_KIND, PROJECT_KIND)
SCAN_HINT = (
    "cocoonplan reads every *.yaml and *.yml file of the project, to know which VMs are still "
    f"defined, and only {YAML_BOUNDS}: keep the file within them, or move it out of the project "
    "or into a hidden directory"
)
VM_SHAPE = (("metadata", "name"), ("spec", "node"))
"""Keys a VM spec always has; with ``spec.snapshot`` or ``spec.image`` they make a document
recognisably a VM spec, whatever its kind: ``metadata.name``, ``spec.node`` and one of
``spec.snapshot``/``spec.image``, each present and not null. Kubernetes manifests do not have
that shape (a pod's node is ``spec.nodeName``, its images are under ``spec.containers``)."""
SHAPE_TEXT = "metadata.name, spec.node and spec.snapshot or spec.image"


UNLISTABLE_HINT = (
    "make it readable and searchable for this user, or exclude it: move it out of the project or "
    "give it a hidden name (starting with `.`); a spec cocoonplan cannot read would look deleted"
)


def spec_files(paths: Sequence[Path], cwd: Path) -> list[Path]:
    """The YAML files named, and those found below named directories, sorted, without duplicates.

    A file named is taken as named: its directory is resolved, the file itself is not, so a
    link there is refused when it is read. Below a directory (see :func:`_yaml_below`) every
    entry of a YAML suffix that is not a directory counts, whatever it is.
    """
    files: list[Path] = []
    for path in paths:
        named = cwd / path
        if named.is_dir():
            files += _yaml_below(named.resolve(), cwd)
        elif os.path.lexists(named):
            files.append(named.parent.resolve() / named.name)
        else:
            raise CocoonplanError(
                f"{path}: no such file or directory", hint="name spec files or directories that exist"
            )
    return list(dict.fromkeys(files))


def _yaml_below(root: Path, cwd: Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` entry below ``root`` but the project file, sorted; hidden
    entries (and all below them) are skipped, and links to directories are not followed.

    Nothing else is skipped: a link, FIFO or device of a YAML name is returned, to be refused
    when read, and a directory that cannot be listed is an error naming it. Skipped, either
    would make the VMs its specs define look removed, and a plan would delete them.
    """
    found: list[Path] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
        except OSError as exc:
            try:
                shown = directory.relative_to(cwd.resolve()).as_posix()
            except ValueError:
                shown = str(directory)
            raise CocoonplanError(
                f"{shown}: cannot list the directory: {exc.strerror or exc}", hint=UNLISTABLE_HINT
            ) from exc
        for name, is_directory in entries:
            if name.startswith("."):
                continue
            if is_directory:
                pending.append(directory / name)
            elif name.endswith(SPEC_SUFFIXES) and name != PROJECT_FILE:
                found.append(directory / name)
    return sorted(found)


@dataclass(frozen=True)
class ProjectIndex:
    """Every VM and reference the project's YAML files name, whatever else they hold."""

    vms: frozenset[tuple[str, str]]
    """(node, VM name) of every ``kind: VM`` document, and of every VM document whose kind is
    mistyped (see :func:`kind_mistake`)."""
    references: frozenset[str]
    """Every ``snapshot``, ``image`` and ``expect.baseImage`` as written."""


def _value_at(data: object, *keys: str) -> object:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _str_at(data: object, *keys: str) -> str | None:
    value = _value_at(data, *keys)
    return value if isinstance(value, str) else None


def _has_vm_shape(data: dict[Any, Any]) -> bool:
    sources = (("spec", "snapshot"), ("spec", "image"))
    return all(_value_at(data, *keys) is not None for keys in VM_SHAPE) and any(
        _value_at(data, *keys) is not None for keys in sources
    )


def kind_mistake(data: dict[Any, Any]) -> tuple[str, str] | None:
    """What is wrong with a document's kind, as (summary, hint); None for ``kind: VM`` and for
    other tools' documents, which a GitOps repo may hold beside the specs.

    Skipping a mistyped VM document silently would make its VM look removed, and a plan
    would delete it: these mistakes are errors instead. So is a document of another kind and
    apiVersion that is shaped like a VM spec (:data:`VM_SHAPE`): whatever its kind says, a
    plan must not take the VM it defines for removed.
    """
    kind, api_version = data.get("kind"), data.get("apiVersion")
    ours = isinstance(api_version, str) and api_version.startswith(API_GROUP)
    if kind == VM_KIND:
        return None
    if kind is None:
        if _has_vm_shape(data):
            return "kind: missing in a document shaped like a VM spec", "did you mean kind: VM?"
        if ours:
            return f"kind: missing in a document of apiVersion {api_version}", "did you mean kind: VM?"
        return None
    near = next((k for k in KNOWN_KINDS if isinstance(kind, str) and kind.lower() == k.lower()), None)
    if not ours and near != VM_KIND and _has_vm_shape(data):
        # Another tool's kind would be skipped, and the VM this document defines deleted.
        return (
            f"kind: {kind!r} in a document shaped like a VM spec ({SHAPE_TEXT})",
            f"did you mean kind: {VM_KIND}? Another tool's document must not have this shape "
            "in the project: move it out, or into a hidden directory",
        )
    if kind == PROJECT_KIND:
        # Only the nearest cocoonplan.yaml is read as the project file. Registries or nodes
        # written here would be ignored without a word, so ours is refused; other tools'
        # Project kinds (OpenShift, Config Connector) are theirs and skipped.
        if ours:
            return (
                f"kind: a {PROJECT_KIND} document is read only from {PROJECT_FILE}, never from a spec file",
                f"move it into {PROJECT_FILE}, the project file at or above the specs",
            )
        return None
    if near == PROJECT_KIND:
        return (
            f"kind: unknown kind {kind!r} (kinds are case-sensitive)",
            f"did you mean kind: {PROJECT_KIND}? It belongs in {PROJECT_FILE}, not in a spec file",
        )
    if near is not None:
        return f"kind: unknown kind {kind!r} (kinds are case-sensitive)", f"did you mean kind: {near}?"
    if ours:
        return (
            f"kind: unknown kind {kind!r} for apiVersion {api_version} (spec files hold kind: {VM_KIND})",
            f"did you mean kind: {VM_KIND}?",
        )
    return None


def _defines_vm(data: object) -> bool:
    # A mistyped kind still claims its VM: a typo must never make a VM look removed.
    return isinstance(data, dict) and (data.get("kind") == VM_KIND or kind_mistake(data) is not None)


def index_project(directory: Path) -> ProjectIndex:
    """Scan every YAML file under the project, leniently: a file that is not YAML names nothing.

    This answers "does any spec still define this VM / use this reference?", so that planning
    or locking part of a repo never deletes a VM, or drops a lock entry, that a spec elsewhere
    still needs. Validation is left to the files actually planned.

    A file that cannot be read, or exceeds the bounds YAML is read within, is a SpecError
    naming it: skipped, it would name nothing, and a VM it defines could be deleted as no
    longer defined. Only malformed YAML is still skipped: other tools' templates (a Helm
    chart's, say) are not YAML until rendered, and refusing them would refuse such repos.
    """
    vms: set[tuple[str, str]] = set()
    references: set[str] = set()
    base = directory.resolve()
    for file in spec_files([directory], directory):
        display = file.relative_to(base).as_posix()
        text = read_yaml(file, display, SCAN_HINT)
        try:
            # A spec file being planned was parsed just so, under the same name: not again.
            documents = [document.data for document in parsed_text(text, display)]
        except SpecError as exc:
            if isinstance(exc.__cause__, YAMLLimitError):
                raise limit_error(exc.__cause__, display, SCAN_HINT) from exc.__cause__
            # Not a valid spec file (malformed, a key twice): read leniently.
            try:
                documents = load_yaml(text)
            except YAMLLimitError as exc:
                raise limit_error(exc, display, SCAN_HINT) from exc
            except yaml.YAMLError:
                continue
        for document in documents:
            if not _defines_vm(document):
                continue
            name, node = _str_at(document, "metadata", "name"), _str_at(document, "spec", "node")
            if name and node:
                vms.add((node, name))
            for keys in (("spec", "snapshot"), ("spec", "image"), ("spec", "expect", "baseImage")):
                reference = _str_at(document, *keys)
                if reference:
                    references.add(reference)
    return ProjectIndex(vms=frozenset(vms), references=frozenset(references))


def validate_document(document: LocatedDocument) -> VMSpec:
    """Validate one located document as a VM spec, raising a located SpecError."""
    try:
        return VMSpec.model_validate(document.data)
    except ValidationError as exc:
        raise document.validation_error(exc) from exc


def is_vm_document(document: LocatedDocument) -> bool:
    """Whether a document declares ``kind: VM`` (other tools' kinds in a repo are skipped)."""
    return isinstance(document.data, dict) and document.data.get("kind") == VM_KIND


def load_specs(path: Path, display: str, nodes: Collection[str]) -> list[LoadedSpec]:
    """Load every ``kind: VM`` document of a YAML file, validated; errors name file:line:column.

    A mistyped kind (see :func:`kind_mistake`) is an error; other tools' documents are skipped.

    ``nodes`` are the node names the project file declares; a spec naming another is an error.
    """
    loaded = []
    for document in read_documents(path, display):
        if not isinstance(document.data, dict):
            raise document.error(
                (),
                "a document must be a mapping with apiVersion, kind, metadata and spec",
                hint="remove the document, or move the file out of the project or into a hidden directory",
            )
        if mistake := kind_mistake(document.data):
            summary, hint = mistake
            raise document.error(("kind",), summary, hint=hint)
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
