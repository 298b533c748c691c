"""Real registries for tests: Debian's docker-registry (distribution 2.8) on free loopback ports.

Fixtures (registered in conftest.py):

* ``registry_factory`` (session): starts registries on demand and stops them all at the end;
* ``registry`` (session): a plain registry, no auth;
* ``basic_registry`` (session): htpasswd basic auth (bcrypt cost 4, so each request stays fast),
  user ``BASIC_USER`` / password ``BASIC_PASSWORD``;
* ``fresh_registry`` (function): a plain registry of the test's own, free to stop or corrupt.

The token-auth variant (``registry_factory.token``) checks JWTs issued by :class:`TokenServer`,
a small bearer-token service on loopback signing ES256 tokens with a self-signed certificate.

Content is pushed with independent clients only (oras-py, skopeo), never with the code under
test. oras-py's 131 s retry decorator is unwrapped once, here, so failures surface at once.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import oras.client
import oras.provider
import pytest

from needs import missing_tool

REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")
HTPASSWD_BIN = shutil.which("htpasswd")
SKOPEO_BIN = shutil.which("skopeo")
BASIC_USER = "cocoon"
BASIC_PASSWORD = "s3cret-pw"
TOKEN_SERVICE = "cocoon-test-registry"
TOKEN_ISSUER = "cocoon-test-issuer"

# oras-py retries every failure for 131 s; tests must fail fast instead.
_do_request = oras.provider.Registry.do_request
setattr(oras.provider.Registry, "do_request", getattr(_do_request, "__wrapped__", _do_request))  # noqa: B010

_CONFIG = """version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: "%(root)s"}
  delete: {enabled: true}
http: {addr: "127.0.0.1:%(port)d", secret: test-secret}
%(auth)s"""


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound and released; nothing else races for it here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def blob_digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


@dataclass
class RegistryServer:
    """One running docker-registry process."""

    host: str
    """``127.0.0.1:<port>``."""
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __repr__(self) -> str:  # no temporary paths in test output
        return f"RegistryServer({self.host})"

    def blob_file(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob (manifests are blobs too)."""
        hex_part = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)


class RegistryFactory:
    """Starts docker-registry processes under one temporary directory and stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[RegistryServer] = []

    def plain(self, storage: Path | None = None) -> RegistryServer:
        return self._start("", storage)

    def basic(self, user: str = BASIC_USER, password: str = BASIC_PASSWORD) -> RegistryServer:
        if HTPASSWD_BIN is None:
            missing_tool("htpasswd", "apache2-utils")
        entry = subprocess.run(
            [HTPASSWD_BIN, "-Bbn", "-C", "4", user, password], capture_output=True, text=True, check=True
        ).stdout.strip()
        htpasswd = self._new_dir("htpasswd") / "htpasswd"
        htpasswd.write_text(entry + "\n")
        return self._start(f'auth: {{htpasswd: {{realm: cocoon-test, path: "{htpasswd}"}}}}\n', None)

    def token(self, tokens: TokenServer, storage: Path | None = None) -> RegistryServer:
        auth = (
            f'auth: {{token: {{realm: "{tokens.realm}", service: {TOKEN_SERVICE}, issuer: {TOKEN_ISSUER}, '
            f'rootcertbundle: "{tokens.cert_file}"}}}}\n'
        )
        return self._start(auth, storage)

    def _new_dir(self, prefix: str) -> Path:
        for number in range(1000):
            path = self.workdir / f"{prefix}{number}"
            if not path.exists():
                path.mkdir(parents=True)
                return path
        raise RuntimeError("too many registries")

    def _start(self, auth: str, storage: Path | None) -> RegistryServer:
        if REGISTRY_BIN is None:
            missing_tool("docker-registry", "docker-registry")
        directory = self._new_dir("registry")
        storage = storage or directory / "data"
        port = free_port()
        config = directory / "config.yml"
        config.write_text(_CONFIG % {"root": storage, "port": port, "auth": auth})
        log = directory / "log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        server = RegistryServer(host=f"127.0.0.1:{port}", storage=storage, process=process, log=log)
        self.started.append(server)
        deadline = time.monotonic() + 10
        while True:
            try:
                # 401 counts as up: the auth variants answer /v2/ that way.
                if httpx.get(server.url + "/v2/", timeout=0.5).status_code in (200, 401):
                    return server
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("docker-registry did not start:\n" + log.read_text())
            time.sleep(0.01)

    def close(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture(scope="session")
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    factory = RegistryFactory(tmp_path_factory.mktemp("registries"))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def registry(registry_factory: RegistryFactory) -> RegistryServer:
    return registry_factory.plain()


@pytest.fixture(scope="session")
def basic_registry(registry_factory: RegistryFactory) -> RegistryServer:
    return registry_factory.basic()


@pytest.fixture
def fresh_registry(registry_factory: RegistryFactory) -> Iterator[RegistryServer]:
    server = registry_factory.plain()
    yield server
    server.stop()


# --------------------------------------------------------------------------- pushing with oras-py


@dataclass(frozen=True)
class Pushed:
    """What oras-py pushed: the manifest digest from the push response header, and the blobs."""

    reference: str
    """``host/repository:tag``."""
    digest: str
    manifest: dict[str, Any] = field(repr=False)
    """The manifest as oras-py reads it back (parsed JSON)."""
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Layer title → content."""

    def layer(self, title: str) -> dict[str, Any]:
        layers: list[dict[str, Any]] = self.manifest["layers"]
        return next(item for item in layers if item["annotations"]["org.opencontainers.image.title"] == title)


def oras_client(
    server: RegistryServer, user: str | None = None, password: str | None = None
) -> oras.client.OrasClient:
    if user is None:
        return oras.client.OrasClient(hostname=server.host, insecure=True)
    client = oras.client.OrasClient(hostname=server.host, insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(user, password)
    return client


def push_files(
    server: RegistryServer,
    repository: str,
    tag: str,
    files: Mapping[str, bytes],
    workdir: Path,
    *,
    user: str | None = None,
    password: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Pushed:
    """Push ``files`` (title → bytes) as layers of one artifact with oras-py; return what it pushed."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for title, content in files.items():
        (workdir / title).write_bytes(content)
        paths.append(f"{workdir / title}:application/vnd.cocoon.test.layer.v1")
    config = workdir / "config.json"
    config.write_bytes(b'{"note":"cocoonplan test"}')
    client = oras_client(server, user, password)
    reference = f"{server.host}/{repository}:{tag}"
    response = client.push(
        target=reference,
        files=paths,
        manifest_config=f"{config}:application/vnd.cocoon.test.config.v1+json",
        manifest_annotations=dict(annotations or {"vnd.cocoon.test": "yes"}),
        disable_path_validation=True,
    )
    digest = response.headers["Docker-Content-Digest"]
    manifest = client.get_manifest(f"{server.host}/{repository}@{digest}")
    return Pushed(reference=reference, digest=digest, manifest=manifest, files=dict(files))


def skopeo_to_layout(server: RegistryServer, repository: str, tag: str, layout: Path, ref_name: str) -> None:
    """Copy ``repository:tag`` from the registry into the OCI layout ``layout`` named ``ref_name``."""
    if SKOPEO_BIN is None:
        missing_tool("skopeo", "skopeo")
    subprocess.run(
        [
            SKOPEO_BIN,
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{server.host}/{repository}:{tag}",
            f"oci:{layout}:{ref_name}",
        ],
        check=True,
        capture_output=True,
    )


def write_docker_config(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Write ``config.json`` into ``directory``; return an env mapping with DOCKER_CONFIG pointing there."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return {"DOCKER_CONFIG": str(directory)}


def basic_auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


# --------------------------------------------------------------------------- bearer token service


class TokenServer:
    """A bearer-token service on loopback, the realm of a distribution ``auth: token`` registry.

    It grants every scope asked for to the one configured user (HTTP basic on the token
    request), or to anyone when ``user`` is None, signing ES256 JWTs whose ``x5c`` header
    carries the self-signed certificate the registry trusts (``rootcertbundle``). Every
    token request is recorded in ``requests`` as ``(service, scope, user or None)``.
    """

    def __init__(self, workdir: Path, user: str | None = None, password: str | None = None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.requests: list[tuple[str | None, str | None, str | None]] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cocoon-test-token-issuer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = workdir / "token-cert.pem"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self._http.server_address[1]}/token"
        # A short poll interval: shutdown() waits for the serving loop to notice, 0.5 s by default.
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def issue(self, scope: str | None, subject: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        access = []
        for item in (scope or "").split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": hashlib.sha256(f"{now}{scope}{len(self.requests)}".encode()).hexdigest()[:16],
            "access": access,
        }
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)  # JWS wants the raw 64-byte r || s, not DER
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                user = _basic_user(self.headers.get("Authorization"), server.password)
                service = query.get("service", [None])[0]
                scope = query.get("scope", [None])[0]
                server.requests.append((service, scope, user))
                if url.path != "/token":
                    self._send(404, {"error": "not found"})
                elif server.user is not None and user != server.user:
                    self._send(401, {"error": "invalid credentials"})
                else:
                    # access_token (the OAuth2 spelling) rather than token, to exercise that branch.
                    self._send(
                        200, {"access_token": server.issue(scope, user or "anonymous"), "expires_in": 300}
                    )

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _basic_user(header: str | None, password: str | None) -> str | None:
    """The user of a basic Authorization header whose password is ``password``, else None."""
    if not header or not header.startswith("Basic "):
        return None
    user, _, given = base64.b64decode(header[6:]).decode().partition(":")
    return user if given == password else None
