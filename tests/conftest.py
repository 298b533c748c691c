"""Shared pytest fixtures; the real-registry fixtures live in registry_server.py."""

import shutil

import pytest

from needs import missing_tool, require_root
from registry_server import basic_registry, fresh_registry, registry, registry_factory

__all__ = ["basic_registry", "erofs_as_root", "fresh_registry", "registry", "registry_factory"]


@pytest.fixture
def erofs_as_root() -> None:
    """Layer conversion as cocoon's: erofs-utils, and root to keep the tar's ownership, device
    nodes and trusted.* xattrs."""
    if shutil.which("mkfs.erofs") is None:
        missing_tool("mkfs.erofs", "erofs-utils")
    require_root("layer conversion keeps the tar's ownership, device nodes and trusted.* xattrs")
