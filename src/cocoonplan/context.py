"""A project file together with where it lives: the base of every relative path it names."""

from __future__ import annotations

from pathlib import Path

from cocoonplan.model import Model
from cocoonplan.project import Project


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
