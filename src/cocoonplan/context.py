"""A project file together with where it lives (the base of every relative path it names),
found and loaded with its specs: all a command needs offline."""

from __future__ import annotations

import os
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
        """Resolve a path written in the project file, but for its last component: a file
        there (an exported state document) is read by its name, so a link committed in its
        place is refused when read, never followed to what it names. A directory is opened
        as named (see :mod:`cocoonplan.nodefs`)."""
        path = self.directory / relative
        if path.name in ("", ".", ".."):
            return path.resolve()
        return path.parent.resolve() / path.name

    def cache_directory(self) -> Path:
        """The cache directory the project file names (``cache:``), where cocoonplan writes.

        Inside the project it is taken as written, and no component of it there may be a
        symbolic link: one committed at ``.cocoonplan/cache`` (or at ``.cocoonplan``) would
        make the cache write its blobs wherever the link points. A path outside the project
        (an absolute one, say) is the project file's choice and is resolved as the OS does.
        """
        written = self.directory / self.project.cache
        path = Path(os.path.normpath(written))
        try:
            inside = path.relative_to(self.directory)
        except ValueError:
            return written.resolve()
        component = self.directory
        for part in inside.parts:
            component = component / part
            if component.is_symlink():
                shown = component.relative_to(self.directory).as_posix()
                raise CocoonplanError(
                    f"cache directory {self.project.cache}: {shown} is a symbolic link inside the "
                    "project; cocoonplan never writes its cache through a link",
                    hint="remove the link (a cache is never committed), or set `cache:` in "
                    f"{PROJECT_FILE} to a directory outside the project",
                )
        return path


def display_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` as messages and plans show it (as given when outside it).
    A link is shown where it is, not where it points: it is refused when read, by its name."""
    try:
        resolved = path.parent.resolve() / path.name if path.is_symlink() else path.resolve()
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _holds_project_file(directory: Path) -> bool:
    """Whether ``directory`` has a ``cocoonplan.yaml`` that is not a directory. A link, FIFO or
    device of that name counts, to be refused when read: skipped, the search would go on to a
    project file above, and plan against another project."""
    candidate = directory / PROJECT_FILE
    return os.path.lexists(candidate) and not (candidate.is_dir() and not candidate.is_symlink())


def find_project(paths: Sequence[Path], cwd: Path) -> ProjectContext:
    """Find the nearest ``cocoonplan.yaml`` at or above the given paths; all must share it."""
    found: set[Path | None] = set()
    for path in paths or [cwd]:
        start = (cwd / path).resolve()
        start = start if start.is_dir() else start.parent
        found.add(next((d / PROJECT_FILE for d in (start, *start.parents) if _holds_project_file(d)), None))
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


def require_project(starts: Sequence[Path], cwd: Path, *, command: str) -> ProjectContext:
    """The project of the first of ``starts`` (relative to ``cwd``; a file stands for its
    directory) that has a ``cocoonplan.yaml`` at or above it. Commands that act on a node
    declared there (``apply``, ``import``, ``force-unlock``) need one: without it they fail
    saying where they looked, instead of finding the node undeclared in an empty project."""
    searched: list[str] = []
    for start in starts:
        context = find_project([start], cwd)
        if context.file is not None:
            return context
        directory = (cwd / start).resolve()
        shown = str(directory if directory.is_dir() else directory.parent)
        if shown not in searched:
            searched.append(shown)
    raise CocoonplanError(
        f"no {PROJECT_FILE} in {' or above, nor in '.join(searched)} or above",
        hint=f"run {command} in the project directory, or pass --chdir DIR naming it",
    )


def load_project(file: Path, display: str) -> Project:
    """Read and validate a project file; errors name file:line:column."""
    documents = read_documents(file, display)
    if len(documents) != 1:
        raise SpecError(
            "a project file holds exactly one YAML document",
            file=display,
            hint="remove the other documents (and the `---` lines between them)",
        )
    document = documents[0]
    try:
        return Project.model_validate(document.data)
    except ValidationError as exc:
        raise document.validation_error(exc, "project.schema.json") from exc


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
