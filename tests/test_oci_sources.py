"""open_sources picks the store for each registry host from the project file."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cocoonplan.context import ProjectContext
from cocoonplan.oci.cache import CachingStore
from cocoonplan.oci.layout import LayoutStore
from cocoonplan.oci.registry import RegistryStore
from cocoonplan.oci.sources import Sources, is_loopback, open_sources
from cocoonplan.project import Project, RegistrySource
from registry_server import RegistryServer, basic_auth_entry, push_files, write_docker_config


def context(directory: Path, **project: object) -> ProjectContext:
    return ProjectContext(project=Project.model_validate(project), directory=directory, file=None)


def inner(sources: Sources, host: str) -> RegistryStore | LayoutStore:
    store = sources.store_for(host)
    assert isinstance(store, CachingStore)
    assert isinstance(store.inner, RegistryStore | LayoutStore)
    return store.inner


@pytest.mark.parametrize(
    ("host", "endpoint"),
    [
        ("ghcr.io", "https://ghcr.io"),
        ("docker.io", "https://registry-1.docker.io"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.8.9.10", "http://127.8.9.10"),
        ("localhost:5000", "http://localhost:5000"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("registry.lan:5000", "http://registry.lan:5000"),
        ("10.0.0.1:5000", "https://10.0.0.1:5000"),
    ],
)
def test_registry_endpoints(tmp_path: Path, host: str, endpoint: str) -> None:
    sources = open_sources(context(tmp_path, insecure=["registry.lan:5000"]), httpx.Client(), {})
    store = inner(sources, host)
    assert isinstance(store, RegistryStore)
    assert store.endpoint == endpoint
    assert store.host == host
    sources.close()


def test_layouts_mirrors_credentials_and_one_store_per_host(tmp_path: Path) -> None:
    env = write_docker_config(
        tmp_path / "docker",
        {"auths": {"mirror.lan:5000": basic_auth_entry("m", "p"), "quay.io": basic_auth_entry("q", "p")}},
    )
    registries = {
        "ghcr.io": RegistrySource(layout="layouts/ghcr"),
        "quay.io": RegistrySource(),
        "docker.io": RegistrySource(mirror="mirror.lan:5000"),
    }
    client = httpx.Client()
    with open_sources(
        context(tmp_path / "project", registries=registries, insecure=["mirror.lan:5000"], cache="c"),
        client,
        env,
    ) as sources:
        layout = inner(sources, "ghcr.io")
        assert isinstance(layout, LayoutStore)
        assert layout.path == (tmp_path / "project/layouts/ghcr").resolve()
        mirror = inner(sources, "docker.io")
        assert isinstance(mirror, RegistryStore)
        assert (mirror.endpoint, mirror.host) == ("http://mirror.lan:5000", "docker.io")
        assert mirror.credentials is not None and mirror.credentials.username == "m"
        quay = inner(sources, "quay.io")
        assert isinstance(quay, RegistryStore)
        assert quay.endpoint == "https://quay.io"
        assert quay.credentials is not None and quay.credentials.username == "q"
        assert sources.store_for("quay.io") is sources.store_for("quay.io")
        assert sources.cache.root == (tmp_path / "project/c").resolve()
    assert client.is_closed


def test_mirror_serves_a_canonical_host_through_the_cache(registry: RegistryServer, tmp_path: Path) -> None:
    pushed = push_files(registry, "sources/snap", "v1", {"s.bin": b"mirrored"}, tmp_path / "push")
    project = context(tmp_path, registries={"ghcr.io": {"mirror": registry.url}})
    with open_sources(project, httpx.Client(timeout=5), {}) as sources:
        store = sources.store_for("ghcr.io")
        assert store.describe() == f"registry {registry.url} (for ghcr.io)"
        assert store.get_manifest("sources/snap", "v1").digest == pushed.digest
    assert (tmp_path / ".cocoonplan/cache/blobs/sha256" / pushed.digest.removeprefix("sha256:")).is_file()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3:80", True), ("localhost", True), ("[::1]:5000", True), ("::1", True),
     ("ghcr.io", False), ("128.0.0.1:5000", False), ("localhost.example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
