"""RegistryStore against real docker-registry processes; content pushed independently with oras-py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from cocoonplan.errors import DigestMismatchError, NotFoundError, RegistryError
from cocoonplan.oci.credentials import Credentials, load_credentials
from cocoonplan.oci.manifest import Descriptor, MediaType, parse_manifest
from cocoonplan.oci.registry import RegistryStore
from registry_server import (
    BASIC_PASSWORD,
    BASIC_USER,
    TOKEN_SERVICE,
    Pushed,
    RegistryFactory,
    RegistryServer,
    TokenServer,
    basic_auth_entry,
    blob_digest,
    free_port,
    push_files,
    write_docker_config,
)

LAYER = b"layer one\n" * 1000
SECOND = b"second layer" * 300_000  # 3.6 MB: several 1 MiB chunks


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
        yield http


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    files = {"l1.bin": LAYER, "l2.bin": SECOND}
    return push_files(registry, "cocoon/snap", "v1", files, tmp_path_factory.mktemp("push"))


def descriptor(item: dict[str, object], **changes: object) -> Descriptor:
    return Descriptor.model_validate({**item, **changes})


def test_manifest_by_tag_and_digest_is_what_oras_pushed(
    registry: RegistryServer, pushed: Pushed, client: httpx.Client
) -> None:
    store = RegistryStore(registry.host, registry.url, client)
    by_tag = store.get_manifest("cocoon/snap", "v1")
    assert by_tag.digest == pushed.digest
    assert json.loads(by_tag.content) == pushed.manifest
    assert by_tag.media_type == MediaType.OCI_MANIFEST
    by_digest = store.get_manifest("cocoon/snap", pushed.digest)
    assert by_digest == by_tag
    assert store.describe() == f"registry {registry.url}"


def test_blobs_are_downloaded_and_verified(
    registry: RegistryServer, pushed: Pushed, client: httpx.Client, tmp_path: Path
) -> None:
    store = RegistryStore(registry.host, registry.url, client)
    manifest = parse_manifest(store.get_manifest("cocoon/snap", "v1").content, "test manifest")
    assert store.get_blob("cocoon/snap", manifest.config) == b'{"note":"cocoonplan test"}'
    for layer in manifest.layers:
        dest = tmp_path / "out" / str(layer.title)
        store.download_blob("cocoon/snap", layer, dest)
        assert dest.read_bytes() == pushed.files[str(layer.title)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["l1.bin", "l2.bin"]


@pytest.mark.parametrize("delta", [1, -1])
def test_tampered_descriptor_size_is_a_mismatch(
    registry: RegistryServer, pushed: Pushed, client: httpx.Client, tmp_path: Path, delta: int
) -> None:
    store = RegistryStore(registry.host, registry.url, client)
    item = pushed.layer("l2.bin")
    wrong = descriptor(item, size=item["size"] + delta)
    with pytest.raises(DigestMismatchError, match=r"blob sha256:\w+ of cocoon/snap .*failed verification"):
        store.get_blob("cocoon/snap", wrong)
    dest = tmp_path / "l2.bin"
    with pytest.raises(DigestMismatchError):
        store.download_blob("cocoon/snap", wrong, dest)
    assert list(tmp_path.iterdir()) == []  # neither dest nor dest.part


def test_tampered_descriptor_digest_is_a_mismatch(
    registry: RegistryServer, pushed: Pushed, client: httpx.Client, tmp_path: Path
) -> None:
    # Ask for the config blob under the size of another: the registry serves the config
    # bytes, which hash right but have the wrong length.
    store = RegistryStore(registry.host, registry.url, client)
    item = pushed.layer("l1.bin")
    wrong = descriptor(item, digest=pushed.manifest["config"]["digest"])
    with pytest.raises(DigestMismatchError):
        store.download_blob("cocoon/snap", wrong, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_corrupted_registry_content_is_detected(
    fresh_registry: RegistryServer, client: httpx.Client, tmp_path: Path
) -> None:
    content = b"bytes that will rot on the registry's disk\n" * 100
    pushed = push_files(fresh_registry, "cocoon/rot", "v1", {"rot.bin": content}, tmp_path / "push")
    store = RegistryStore(fresh_registry.host, fresh_registry.url, client)
    layer = descriptor(pushed.layer("rot.bin"))

    blob_file = fresh_registry.blob_file(layer.digest)
    blob_file.write_bytes(content.replace(b"rot", b"ROT"))  # same size, other bytes
    with pytest.raises(DigestMismatchError, match="bytes hash to sha256:"):
        store.get_blob("cocoon/rot", layer)
    with pytest.raises(DigestMismatchError):
        store.download_blob("cocoon/rot", layer, tmp_path / "out" / "rot.bin")
    assert list((tmp_path / "out").iterdir()) == []

    manifest_file = fresh_registry.blob_file(pushed.digest)
    manifest_file.write_bytes(manifest_file.read_bytes().replace(b'"yes"', b'"yez"'))
    with pytest.raises(DigestMismatchError, match=f"manifest cocoon/rot@{pushed.digest}"):
        store.get_manifest("cocoon/rot", pushed.digest)
    # By tag nothing names the digest but the registry's Docker-Content-Digest header.
    with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
        store.get_manifest("cocoon/rot", "v1")


def test_missing_content_is_not_found(registry: RegistryServer, pushed: Pushed, client: httpx.Client) -> None:
    store = RegistryStore(registry.host, registry.url, client)
    with pytest.raises(
        NotFoundError, match=f"manifest cocoon/snap:nope not found at registry {registry.url}"
    ):
        store.get_manifest("cocoon/snap", "nope")
    with pytest.raises(NotFoundError, match="cocoon/absent:v1") as raised:
        store.get_manifest("cocoon/absent", "v1")
    assert "MANIFEST_UNKNOWN" in raised.value.detail
    missing = blob_digest(b"never pushed")
    with pytest.raises(NotFoundError, match=f"manifest cocoon/snap@{missing}"):
        store.get_manifest("cocoon/snap", missing)
    with pytest.raises(NotFoundError, match=f"blob {missing} of cocoon/snap"):
        store.get_blob("cocoon/snap", Descriptor(media_type="x", digest=missing, size=12))


def test_unreachable_endpoint_fails_fast(client: httpx.Client) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = RegistryStore("registry.example", endpoint, client)
    started = time.monotonic()
    with pytest.raises(
        RegistryError, match=f"cannot fetch manifest cocoon/snap:v1 from registry {endpoint}"
    ) as raised:
        store.get_manifest("cocoon/snap", "v1")
    assert time.monotonic() - started < 2
    assert "listening at" in raised.value.hint
    assert "registries.registry.example" in raised.value.hint


def test_silent_endpoint_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with httpx.Client(timeout=httpx.Timeout(0.2)) as http:
            store = RegistryStore("127.0.0.1", endpoint, http)
            with pytest.raises(RegistryError, match="timed out fetching manifest cocoon/snap:v1"):
                store.get_manifest("cocoon/snap", "v1")


def test_basic_auth_with_docker_config_credentials(
    basic_registry: RegistryServer, client: httpx.Client, tmp_path: Path
) -> None:
    pushed = push_files(
        basic_registry, "cocoon/private", "v1", {"p.bin": b"private"}, tmp_path / "push",
        user=BASIC_USER, password=BASIC_PASSWORD,
    )  # fmt: skip
    env = write_docker_config(
        tmp_path / "docker", {"auths": {basic_registry.host: basic_auth_entry(BASIC_USER, BASIC_PASSWORD)}}
    )
    credentials = load_credentials(basic_registry.host, env)
    store = RegistryStore(basic_registry.host, basic_registry.url, client, credentials)
    assert store.get_manifest("cocoon/private", "v1").digest == pushed.digest
    store.download_blob("cocoon/private", descriptor(pushed.layer("p.bin")), tmp_path / "p.bin")
    assert (tmp_path / "p.bin").read_bytes() == b"private"


def test_basic_auth_without_or_with_wrong_credentials_fails_clearly(
    basic_registry: RegistryServer, client: httpx.Client
) -> None:
    anonymous = RegistryStore(basic_registry.host, basic_registry.url, client)
    with pytest.raises(
        RegistryError, match="requires authentication and no credentials are configured"
    ) as raised:
        anonymous.get_manifest("cocoon/private", "v1")
    assert f"docker login {basic_registry.host}" in raised.value.hint
    assert "HTTP 401" in raised.value.summary

    env = {"DOCKER_CONFIG": "/nonexistent"}
    assert load_credentials(basic_registry.host, env) is None
    wrong_password = Credentials(username=BASIC_USER, password="wrong-password")
    wrong = RegistryStore(basic_registry.host, basic_registry.url, client, wrong_password)
    with pytest.raises(RegistryError, match=f"refused the credentials for user {BASIC_USER}"):
        wrong.get_manifest("cocoon/private", "v1")


@pytest.fixture
def token_setup(
    registry_factory: RegistryFactory, tmp_path: Path
) -> Iterator[tuple[RegistryServer, TokenServer, Pushed]]:
    # Push through a plain registry, then serve the same storage through a token-auth one.
    storage = tmp_path / "storage"
    plain = registry_factory.plain(storage)
    pushed = push_files(plain, "cocoon/tok", "v1", {"t.bin": b"token protected"}, tmp_path / "push")
    plain.stop()
    tokens = TokenServer(tmp_path, user="robot", password="robot-pw")
    server = registry_factory.token(tokens, storage)
    yield server, tokens, pushed
    server.stop()
    tokens.close()


def test_bearer_token_flow_against_distribution_token_auth(
    token_setup: tuple[RegistryServer, TokenServer, Pushed], client: httpx.Client, tmp_path: Path
) -> None:
    server, tokens, pushed = token_setup
    env = write_docker_config(
        tmp_path / "docker", {"auths": {server.host: basic_auth_entry("robot", "robot-pw")}}
    )
    store = RegistryStore(server.host, server.url, client, load_credentials(server.host, env))
    assert store.get_manifest("cocoon/tok", "v1").digest == pushed.digest
    assert store.get_manifest("cocoon/tok", pushed.digest).digest == pushed.digest
    store.download_blob("cocoon/tok", descriptor(pushed.layer("t.bin")), tmp_path / "t.bin")
    assert (tmp_path / "t.bin").read_bytes() == b"token protected"
    # One token for the repository's pull scope, fetched once and reused for every later request.
    assert tokens.requests == [(TOKEN_SERVICE, "repository:cocoon/tok:pull", "robot")]


def test_bearer_token_refused_without_credentials(
    token_setup: tuple[RegistryServer, TokenServer, Pushed], client: httpx.Client
) -> None:
    server, tokens, _ = token_setup
    store = RegistryStore(server.host, server.url, client)
    with pytest.raises(RegistryError, match="refused a token") as raised:
        store.get_manifest("cocoon/tok", "v1")
    assert tokens.realm in raised.value.summary
    assert "repository:cocoon/tok:pull" in raised.value.summary
    assert "anonymously" in raised.value.summary
    assert "docker login" in raised.value.hint


class _Redirector(BaseHTTPRequestHandler):
    """Answers every GET with a 307 to the same path on ``target`` (as registries hand blobs to storage)."""

    target = ""
    seen: ClassVar[list[str | None]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Accept"))
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_redirects_are_followed(
    registry: RegistryServer, pushed: Pushed, client: httpx.Client, tmp_path: Path
) -> None:
    handler = type("Redirector", (_Redirector,), {"target": registry.url, "seen": []})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as redirector:
        thread = threading.Thread(target=redirector.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        try:
            endpoint = f"http://127.0.0.1:{redirector.server_address[1]}"
            store = RegistryStore(registry.host, endpoint, client)
            assert store.get_manifest("cocoon/snap", "v1").digest == pushed.digest
            store.download_blob("cocoon/snap", descriptor(pushed.layer("l1.bin")), tmp_path / "l1.bin")
            assert (tmp_path / "l1.bin").read_bytes() == LAYER
            assert store.describe() == f"registry {endpoint} (for {registry.host})"
        finally:
            redirector.shutdown()
    assert len(handler.seen) == 2


class _Canned(BaseHTTPRequestHandler):
    """Serves fixed responses by path: a registry that lies, which docker-registry never does."""

    routes: ClassVar[dict[str, tuple[dict[str, str], bytes]]] = {}

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        headers, body = self.routes.get(self.path, ({}, b""))
        self.send_response(200 if self.path in self.routes else 404)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def canned() -> Iterator[tuple[str, dict[str, tuple[dict[str, str], bytes]]]]:
    routes: dict[str, tuple[dict[str, str], bytes]] = {}
    with ThreadingHTTPServer(("127.0.0.1", 0), type("Canned", (_Canned,), {"routes": routes})) as server:
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
        server.shutdown()


def test_manifest_bytes_must_hash_to_the_digest_asked_for(
    canned: tuple[str, dict[str, tuple[dict[str, str], bytes]]], client: httpx.Client
) -> None:
    endpoint, routes = canned
    wanted = b'{"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
    served = wanted.replace(b"[]", b"[ ]")
    digest = blob_digest(wanted)
    content_type = {"Content-Type": MediaType.OCI_MANIFEST}
    routes[f"/v2/lying/repo/manifests/{digest}"] = (content_type, served)  # no Docker-Content-Digest
    routes["/v2/lying/repo/manifests/v1"] = ({**content_type, "Docker-Content-Digest": digest}, served)
    routes["/v2/lying/repo/manifests/v2"] = ({**content_type, "Docker-Content-Digest": "sha512:abc"}, served)
    store = RegistryStore("lying.example", endpoint, client)
    with pytest.raises(DigestMismatchError, match=f"manifest lying/repo@{digest}") as raised:
        store.get_manifest("lying/repo", digest)
    assert f"bytes hash to {blob_digest(served)}" in raised.value.summary
    with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
        store.get_manifest("lying/repo", "v1")
    # A header in another algorithm cannot be compared and is not held against the bytes.
    assert store.get_manifest("lying/repo", "v2").digest == blob_digest(served)
