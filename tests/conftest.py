"""Shared pytest fixtures; the real-registry fixtures live in registry_server.py."""

from registry_server import basic_registry, fresh_registry, registry, registry_factory

__all__ = ["basic_registry", "fresh_registry", "registry", "registry_factory"]
