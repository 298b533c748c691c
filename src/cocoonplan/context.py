"""A project file together with where it lives (the base of every relative path it names),
found and loaded with its specs: all a command needs offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from cocoonplan.document import read_documents
from cocoonplan.errors import CocoonplanError, SpecError
from cocoonplan.model import Model
from cocoonplan.project import PROJECT_FILE, Project
from cocoonplan.spec import LoadedSpec
from cocoonplan.specfile import check_unique, load_specs, spec_files


class ProjectContext(Model):
    """A project file together with the directory its relative paths are resolved against."""

    project: Project
    directory: Path
    """The directory holding ``cocoonplan.yaml`` (or the working directory without one)."""
    file: Path | None
    """The project file, when one was found."""

    def resolve(self, relative: str) -> Path:
        """Resolve a path written in the project file."""
        return (self.directory / relative).resolve()


def display_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` as messages and plans show it (as given when outside it)."""
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def find_project(paths: Sequence[Path], cwd: Path) -> ProjectContext:
    """Find the nearest ``cocoonplan.yaml`` at or above the given paths; all must share it."""
    found: set[Path | None] = set()
    for path in paths or [cwd]:
        start = (cwd / path).resolve()
        start = start if start.is_dir() else start.parent
        found.add(
            next((d / PROJECT_FILE for d in (start, *start.parents) if (d / PROJECT_FILE).is_file()), None)
        )
    if len(found) > 1:
        raise CocoonplanError(
            "the given paths belong to different projects: "
            + ", ".join(sorted(str(f) if f else "(none)" for f in found)),
            hint="plan one project at a time",
        )
    file = found.pop()
    if file is None:
        return ProjectContext(project=Project(), directory=cwd.resolve(), file=None)
    return ProjectContext(
        project=load_project(file, display_path(file, cwd.resolve())), directory=file.parent, file=file
    )


def load_project(file: Path, display: str) -> Project:
    """Read and validate a project file; errors name file:line:column."""
    documents = read_documents(file, display)
    if len(documents) != 1:
        raise SpecError("a project file holds exactly one YAML document", file=display)
    document = documents[0]
    try:
        return Project.model_validate(document.data)
    except ValidationError as exc:
        raise document.validation_error(exc) from exc


def load_all(paths: Sequence[Path], cwd: Path) -> tuple[ProjectContext, list[LoadedSpec]]:
    """Find the project and load every VM spec under ``paths`` (none: ``cwd``); any invalid
    spec fails the whole call. Offline: ``validate`` needs nothing more."""
    paths = list(paths) or [Path()]
    context = find_project(paths, cwd)
    specs: list[LoadedSpec] = []
    for file in spec_files(paths, cwd):
        specs += load_specs(file, display_path(file, context.directory), context.project.nodes)
    check_unique(specs)
    return context, specs
