"""Hostile registries, token realms and credential helpers fail a plan quickly and clearly.

Each server here is a few lines of raw socket code on loopback that misbehaves on purpose:
it accepts and never answers, drips its answer a byte at a time (faster than the read
timeout, so only the overall deadline can end it), announces or streams more than any
manifest may hold, sends a gzip bomb (compressed zeros, endless, as a token, a manifest, a
blob, an error page, a challenge or a redirect: run in a child process whose peak memory is
measured), an unusable token, or names a token realm no credentials may be sent to. Every variant runs
the real CLI with ``COCOONPLAN_TIMEOUT`` set low and asserts exit 1 within a bound, one
line naming the URL, and no traceback, for both ``plan`` and ``lock``.
"""

from __future__ import annotations

import datetime
import functools
import gzip
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from clirunner import run_cli
from cocoonplan.errors import RegistryError
from cocoonplan.oci.authenticator import MAX_TOKEN_BYTES, RegistryAuth
from cocoonplan.oci.credentials import HELPER_OUTPUT_LIMIT
from cocoonplan.oci.store import MAX_MANIFEST_BYTES
from registry_server import write_docker_config

TIMEOUT = 0.3
"""COCOONPLAN_TIMEOUT for every run: a fetch's deadline is 4 times it."""
BOUND = 10.0
"""Seconds within which every hostile variant must have failed the command."""
DRIP_SECONDS = 0.05
"""A dripping server sends a byte this often: well inside the read timeout, never cut off by it."""
MANIFEST_PATH = "/v2/hostile/os/manifests/v1"
PROJECT = """apiVersion: cocoonplan/v1alpha1
kind: Project
registries:
  ghcr.io: {{mirror: "{endpoint}"}}
insecure: [{insecure}]
nodes:
  node-a: {{cpus: 4}}
"""
SPEC = """apiVersion: cocoonplan/v1alpha1
kind: VM
metadata: {name: hostile}
spec: {image: "ghcr.io/hostile/os:v1", node: node-a}
"""

Answer = Callable[["Hostile", socket.socket], None]


class Hostile:
    """An HTTP/1.1 server on loopback that answers each request by the first route its path starts with.

    Every request path is recorded in ``paths``, its head in ``heads``; answers run on their own thread and stop
    (hanging and dripping ones too) once the server is closed or the client hangs up.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Answer] = {}
        self.paths: list[str] = []
        self.heads: list[bytes] = []
        self.stopping = threading.Event()
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self._listener.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)  # closes the socket if it fails
            with conn:
                while not self.stopping.is_set():
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            return
                        head += chunk
                    path = head.split(b" ", 2)[1].decode()
                    self.paths.append(path)
                    self.heads.append(head)
                    route = next(answer for prefix, answer in self.routes.items() if path.startswith(prefix))
                    route(self, conn)
        except OSError:  # the client gave up on the answer: what every hostile answer is for
            return


def send(status: str, headers: Mapping[str, str] | None = None, body: bytes = b"") -> Answer:
    """A complete, well-formed answer (the connection stays open for the next request)."""
    fields = {"Content-Length": str(len(body)), **(headers or {})}
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"

    def answer(server: Hostile, conn: socket.socket) -> None:
        conn.sendall(head.encode() + body)

    return answer


def challenge(realm: str) -> Answer:
    """401 asking for a bearer token from ``realm``, as distribution's token auth does."""
    value = f'Bearer realm="{realm}",service="hostile",scope="repository:hostile/os:pull"'
    return send("401 Unauthorized", {"WWW-Authenticate": value})


def hang(server: Hostile, conn: socket.socket) -> None:
    """Accept the request, never answer."""
    server.stopping.wait()


def drip(start: str) -> Answer:
    """Send ``HTTP/1.1 `` and ``start``, then a space at a time, each soon enough for a read timeout."""

    def answer(server: Hostile, conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {start}".encode())
        while not server.stopping.wait(DRIP_SECONDS):
            conn.sendall(b" ")

    return answer


def endless(status: str, headers: Mapping[str, str]) -> Answer:
    """Send the head, then a chunked body that never ends, as fast as the client reads it."""

    def answer(server: Hostile, conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\n".encode() + _fields({**headers, "Transfer-Encoding": "chunked"}))
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        while not server.stopping.is_set():
            conn.sendall(chunk)

    return answer


def _fields(headers: Mapping[str, str]) -> bytes:
    return ("".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


MANIFEST = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture
def servers() -> Iterator[list[Hostile]]:
    """Hostile servers a test starts (append them); all are closed at its end."""
    started: list[Hostile] = []
    yield started
    for server in started:
        server.close()


def hostile(servers: list[Hostile], tls: ssl.SSLContext | None = None) -> Hostile:
    server = Hostile(tls)
    servers.append(server)
    return server


def project(root: Path, endpoint: str) -> Path:
    """A project reading ghcr.io from ``endpoint`` and one VM spec whose image is there.

    A plain-HTTP endpoint is also listed as insecure, as a registry on another machine would
    have to be (loopback needs no listing).
    """
    root.mkdir(parents=True, exist_ok=True)
    scheme, host = endpoint.split("://", 1)
    insecure = f'"{host}"' if scheme == "http" else ""
    (root / "cocoonplan.yaml").write_text(PROJECT.format(endpoint=endpoint, insecure=insecure))
    (root / "vm.yaml").write_text(SPEC)
    return root


def assert_fails_fast(root: Path, expected: list[str], env: Mapping[str, str] | None = None) -> str:
    """``plan`` and ``lock`` both fail: exit 1 within BOUND, one line holding every ``expected`` text.

    Returns everything both printed.
    """
    env = {"COCOONPLAN_TIMEOUT": str(TIMEOUT), "DOCKER_CONFIG": str(root / "no-docker"), **(env or {})}
    printed = ""
    for command in ("plan", "lock"):
        started = time.monotonic()
        result = run_cli([command, "."], root, env)  # an exception would propagate: no traceback
        elapsed = time.monotonic() - started
        output = result.stdout + result.stderr
        assert result.exit_code == 1, output
        assert elapsed < BOUND, f"{command} took {elapsed:.1f} s"
        assert "Traceback" not in output
        prefix = "  ✗ VM hostile (vm.yaml): " if command == "plan" else "Error: "
        lines = [line for line in output.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1, output
        for text in expected:
            assert text in lines[0], output
        printed += output
    return printed


def test_token_realm_that_accepts_and_never_answers(servers: list[Hostile], tmp_path: Path) -> None:
    server = hostile(servers)
    server.routes = {"/token": hang, "/v2/": challenge(f"{server.url}/token")}
    # The token request carries the client's read timeout; it used to carry none at all.
    assert_fails_fast(
        project(tmp_path, server.url),
        ["timed out fetching manifest hostile/os:v1", f"at {server.url}/token?"],
    )


# Where a server drips: a body of announced size, a chunked body's endless chunk-size line,
# a header line that never ends. httpx's read timeout is per read; each byte resets it.
DRIPS = {
    "body": "200 OK\r\nContent-Type: application/json\r\nContent-Length: 3000\r\n\r\n",
    "chunk-size line": "200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    "header": "200 OK\r\nX-Slow: ",
}


@pytest.mark.parametrize("where", ["body", "header"])
def test_token_realm_that_drips(servers: list[Hostile], tmp_path: Path, where: str) -> None:
    server = hostile(servers)
    server.routes = {"/token": drip(DRIPS[where]), "/v2/": challenge(f"{server.url}/token")}
    assert_fails_fast(
        project(tmp_path, server.url), ["took too long", f"still waiting on {server.url}/token?"]
    )


@pytest.mark.parametrize("where", list(DRIPS))
def test_registry_that_drips_a_manifest(servers: list[Hostile], tmp_path: Path, where: str) -> None:
    server = hostile(servers)
    server.routes = {"/v2/": drip(DRIPS[where])}
    assert_fails_fast(
        project(tmp_path, server.url),
        ["manifest hostile/os:v1", "took too long", f"still waiting on {server.url}{MANIFEST_PATH} after"],
    )


def test_registry_announcing_a_huge_manifest(servers: list[Hostile], tmp_path: Path) -> None:
    server = hostile(servers)
    server.routes = {"/v2/": endless("200 OK", {**MANIFEST, "Content-Length": str(10**15)})}
    assert_fails_fast(
        project(tmp_path, server.url),
        [
            f"registry {server.url} (for ghcr.io) is {10**15} bytes",
            f"over the {MAX_MANIFEST_BYTES} byte limit",
        ],
    )


def test_registry_streaming_an_endless_manifest(servers: list[Hostile], tmp_path: Path) -> None:
    server = hostile(servers)
    server.routes = {"/v2/": endless("200 OK", MANIFEST)}
    assert_fails_fast(
        project(tmp_path, server.url),
        [f"manifest hostile/os:v1 from registry {server.url}", f"over the {MAX_MANIFEST_BYTES} byte limit"],
    )


def test_token_realm_streaming_an_endless_answer(servers: list[Hostile], tmp_path: Path) -> None:
    server = hostile(servers)
    answer = endless("200 OK", {"Content-Type": "application/json"})
    server.routes = {"/token": answer, "/v2/": challenge(f"{server.url}/token")}
    assert_fails_fast(
        project(tmp_path, server.url),
        [f"token service {server.url}/token sent more than {MAX_TOKEN_BYTES} bytes"],
    )


def test_endless_challenge_and_redirect_bodies_are_cut_off(servers: list[Hostile], tmp_path: Path) -> None:
    # httpx reads the bodies of 401 challenges and redirects itself: they are capped all the same.
    server = hostile(servers)
    realm = f"{server.url}/token"
    header = f'Bearer realm="{realm}",service="hostile",scope="repository:hostile/os:pull"'
    server.routes = {
        "/token": send("200 OK", {"Content-Type": "application/json"}, b'{"token": "t"}'),
        "/v2/hostile/os/manifests/": endless(
            "307 Temporary Redirect", {"Location": "/v2/moved/manifests/v1"}
        ),
        "/v2/": endless("401 Unauthorized", {"WWW-Authenticate": header}),
    }
    assert_fails_fast(
        project(tmp_path, server.url), [f"registry {server.url} (for ghcr.io) requires authentication"]
    )
    assert f"{MANIFEST_PATH}" in server.paths
    assert any(path.startswith("/token?") for path in server.paths)


@pytest.mark.parametrize(
    ("realm", "problem"),
    [
        ("http://robot:hunter2@127.0.0.1:{port}/token", "carries a user name or password"),
        ("file:///etc/passwd", "is not an absolute http(s) URL"),
        ("/token", "is not an absolute http(s) URL"),
    ],
)
def test_realms_no_credentials_may_go_to_are_refused(
    servers: list[Hostile], tmp_path: Path, realm: str, problem: str
) -> None:
    server = hostile(servers)
    realm = realm.format(port=server.port)
    server.routes = {"/token": send("200 OK", {}, b'{"token": "t"}'), "/v2/": challenge(realm)}
    shown = realm.replace("robot:hunter2@", "")
    printed = assert_fails_fast(
        project(tmp_path, server.url), [f"refusing the token realm {shown!r}", problem]
    )
    assert not any(path.startswith("/token") for path in server.paths)
    assert "hunter2" not in printed  # a password in the realm is never repeated: CI logs are read by many


def _self_signed(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A TLS server context for 127.0.0.1 and the certificate file a client must trust for it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    # A self-signed leaf for the loopback address: trusted as is through SSL_CERT_FILE.
    unsigned = x509.CertificateBuilder(
        issuer_name=name,
        subject_name=name,
        public_key=key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=now - datetime.timedelta(hours=1),
        not_valid_after=now + datetime.timedelta(days=1),
    )
    loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = unsigned.add_extension(loopback, critical=False).sign(key, hashes.SHA256())
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def test_http_realm_of_an_https_registry_is_refused(servers: list[Hostile], tmp_path: Path) -> None:
    tls, cert_file = _self_signed(tmp_path)
    realm = hostile(servers)
    realm.routes = {"/token": send("200 OK", {}, b'{"token": "t"}')}
    registry = hostile(servers, tls)
    registry.routes = {"/v2/": challenge(f"{realm.url}/token")}
    root = project(tmp_path / "project", registry.url)
    # The refusal itself shows that TLS to the registry worked: only its 401 names the realm.
    assert_fails_fast(
        root,
        [f"refusing the token realm '{realm.url}/token' named by {registry.url}", "is plain HTTP"],
        {"SSL_CERT_FILE": str(cert_file)},
    )
    assert realm.paths == []
    assert registry.paths


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("exec sleep 60\n", f"did not answer for 127.0.0.1:{{port}} within {TIMEOUT:g} s"),
        ("exec yes\n", f"printed more than {HELPER_OUTPUT_LIMIT} bytes for 127.0.0.1:{{port}}"),
    ],
)
def test_credential_helper_that_hangs_or_floods(
    servers: list[Hostile], tmp_path: Path, script: str, message: str
) -> None:
    server = hostile(servers)
    server.routes = {"/v2/": send("404 Not Found")}
    helper = tmp_path / "bin" / "docker-credential-hostile"
    helper.parent.mkdir()
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    env = write_docker_config(tmp_path / "docker", {"credHelpers": {f"127.0.0.1:{server.port}": "hostile"}})
    env["PATH"] = f"{helper.parent}:/usr/bin:/bin"
    root = project(tmp_path / "project", server.url)
    assert_fails_fast(root, ["docker-credential-hostile", message.format(port=server.port)], env)
    assert server.paths == []


def test_the_timeout_setting_must_be_a_positive_number(tmp_path: Path) -> None:
    root = project(tmp_path, "http://127.0.0.1:9")
    for value in ("soon", "0", "-1", "nan", "inf"):
        result = run_cli(["lock", "."], root, {"COCOONPLAN_TIMEOUT": value})
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: COCOONPLAN_TIMEOUT={value!r} is not a positive number")


@pytest.mark.parametrize(
    ("registry", "realm"),
    [
        ("https://registry-1.docker.io/v2/x/manifests/v1", "https://auth.docker.io/token"),
        ("https://registry.gitlab.com/v2/x/manifests/v1", "https://gitlab.com/jwt/auth"),
        ("http://127.0.0.1:5000/v2/x/manifests/v1", "http://127.0.0.1:5001/token"),
        ("http://registry.lan:5000/v2/x/manifests/v1", "https://auth.lan/token"),
    ],
)
def test_realms_on_other_hosts_are_allowed_without_a_downgrade(registry: str, realm: str) -> None:
    assert RegistryAuth("x", None).realm_url(realm, httpx.URL(registry)) == httpx.URL(realm)


@pytest.mark.parametrize(
    "realm",
    [
        "http://auth.docker.io/token",
        "ftp://auth.docker.io/token",
        "https://:pw@auth.docker.io/",
        "https:///t",
    ],
)
def test_realms_that_would_expose_credentials_are_refused(realm: str) -> None:
    registry = httpx.URL("https://registry-1.docker.io/v2/x/manifests/v1")
    with pytest.raises(RegistryError, match="refusing the token realm") as raised:
        RegistryAuth("docker.io", None).realm_url(realm, registry)
    assert "pw" not in raised.value.summary


# Tokens that are no bearer tokens: non-ASCII text once raised UnicodeEncodeError building the
# Authorization header; CR/LF would inject header lines; the rest break RFC 6750's syntax.
@pytest.mark.parametrize(
    "token", ["tökén", "t\r\nX-Injected: yes", "t\nk", "t\x00k", "two words", "=leading", 'quo"te']
)
def test_a_token_that_is_no_bearer_token_is_refused(
    servers: list[Hostile], tmp_path: Path, token: str
) -> None:
    server = hostile(servers)
    body = json.dumps({"token": token}).encode()
    server.routes = {
        "/token": send("200 OK", {"Content-Type": "application/json"}, body),
        "/v2/": challenge(f"{server.url}/token"),
    }
    printed = assert_fails_fast(
        project(tmp_path, server.url),
        [
            f"token service {server.url}/token returned a token for ghcr.io scope repository:hostile/os:pull "
            "that is not a bearer token"
        ],
    )
    assert token not in printed  # never shown: it may be a real token with a stray character
    assert not any(b"authorization: bearer" in head.lower() for head in server.heads)


@pytest.mark.parametrize(
    "token", ["eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_~", "djE6aG9zdGlsZS9vcw+/Zz=="]
)
def test_bearer_tokens_are_sent(servers: list[Hostile], tmp_path: Path, token: str) -> None:
    server = hostile(servers)
    challenged, refused = challenge(f"{server.url}/token"), send("404 Not Found")

    def registry(server: Hostile, conn: socket.socket) -> None:
        authorized = f"Authorization: Bearer {token}\r\n".encode() in server.heads[-1]
        (refused if authorized else challenged)(server, conn)

    server.routes = {
        "/token": send("200 OK", {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()),
        "/v2/": registry,
    }
    assert_fails_fast(project(tmp_path, server.url), ["manifest hostile/os:v1 not found at registry"])


BOMB_PIECE = 1 << 20
"""Zeros per repeated piece of a gzip bomb: each compresses to about a KiB."""
MEMORY_MARGIN = 16 << 20
"""How much higher a child fed a gzip bomb may peak than the same child answered 404: bodies
are capped at a few MiB decoded (measured: at most 4 MiB higher), while one 64 KiB network
read of a bomb inflates to 64 MiB (measured before the cap: 120 MiB to 2 GiB higher)."""
JSON = {"Content-Type": "application/json"}


@functools.cache
def bomb_pieces() -> tuple[bytes, bytes]:
    """The opening and the repeating piece of an endless gzip stream of zeros (about 1000:1).

    After a full flush deflate starts afresh, so compressing the same zeros again gives the
    same bytes: the test holds two small pieces, never the stream.
    """
    zeros = bytes(BOMB_PIECE)
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    pieces = [compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH) for _ in range(3)]
    assert pieces[1] == pieces[2]
    return pieces[0], pieces[1]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def bomb(status: str, headers: Mapping[str, str]) -> Answer:
    """Send the head, then an endless chunked gzip stream of zeros, as fast as the client reads."""

    def answer(server: Hostile, conn: socket.socket) -> None:
        first, piece = bomb_pieces()
        fields = {**headers, "Content-Encoding": "gzip", "Transfer-Encoding": "chunked"}
        conn.sendall(f"HTTP/1.1 {status}\r\n".encode() + _fields(fields) + _chunk(first))
        batch = _chunk(piece * 64)
        while not server.stopping.is_set():
            conn.sendall(batch)

    return answer


PEAK_PROBE = """
import atexit
import sys


def _report_peak() -> None:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    sys.stderr.write(f"peak-rss-kib {peak}\\n")


atexit.register(_report_peak)
"""
"""Prepended to a child's script: at exit it prints its peak RSS since exec. VmHWM belongs to
the process's own address space; getrusage's ru_maxrss (also wait4's) would count the parent's
pages as well, which the child held between fork and exec."""


def run_child(args: list[str], cwd: Path) -> tuple[int, str, int]:
    """Run ``python -c PEAK_PROBE+SCRIPT ARGS...`` (``args`` = [SCRIPT, ARGS...]) in ``cwd``: its exit
    code, its output and its peak RSS in bytes."""
    env = {**os.environ, "COCOONPLAN_TIMEOUT": str(TIMEOUT), "DOCKER_CONFIG": str(cwd / "no-docker")}
    script, *rest = args
    child = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE + script, *rest],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=3 * BOUND,
        check=False,
    )
    peaks = [line.split()[1] for line in child.stdout.splitlines() if line.startswith("peak-rss-kib ")]
    assert len(peaks) == 1, child.stdout
    return child.returncode, child.stdout, int(peaks[0]) << 10


LOCK = ["from cocoonplan.cli import main\n\nmain()\n", "lock", "."]
BLOB_SCRIPT = """
import sys
from pathlib import Path

import httpx

from cocoonplan.errors import CocoonplanError
from cocoonplan.oci.manifest import Descriptor
from cocoonplan.oci.registry import RegistryStore

endpoint, method, digest = sys.argv[1:]
config = Descriptor(mediaType="application/vnd.oci.image.config.v1+json", digest=digest, size=1 << 20)
with httpx.Client(timeout=5) as client:
    store = RegistryStore("ghcr.io", endpoint, client)
    try:
        if method == "get_blob":
            store.get_blob("hostile/os", config)
        else:
            store.download_blob("hostile/os", config, Path("blob"))
    except CocoonplanError as error:
        print(f"Error: {error.summary}")
        sys.exit(1)
"""
DIGEST = "sha256:" + hashlib.sha256(b"config").hexdigest()


def blob_command(endpoint: str, method: str) -> list[str]:
    return [BLOB_SCRIPT, endpoint, method, DIGEST]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[list[str]], int]]:
    """The peak RSS of a command (LOCK or a blob_command) failing on a registry that answers 404."""
    peaks: dict[str, int] = {}
    server = Hostile()
    server.routes = {"/v2/": send("404 Not Found")}

    def peak(command: list[str]) -> int:
        kind = "lock" if command is LOCK else "blob"
        if kind not in peaks:
            root = project(tmp_path_factory.mktemp("baseline"), server.url)
            args = LOCK if command is LOCK else blob_command(server.url, "get_blob")
            code, output, peaks[kind] = run_child(args, root)
            assert code == 1, output
        return peaks[kind]

    yield peak
    server.close()


def assert_bounded(
    command: list[str], root: Path, expected: list[str], baseline: Callable[[list[str]], int]
) -> None:
    """``command`` fails in a child: exit 1, one ``Error:`` line with every ``expected`` text, and a
    peak RSS within MEMORY_MARGIN of the same command answered 404."""
    code, output, peak = run_child(command, root)
    assert code == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    for text in expected:
        assert text in lines[0], output
    over = peak - baseline(command)
    assert over < MEMORY_MARGIN, f"peaked {over >> 20} MiB above a 404 answer ({peak >> 20} MiB)"


def _bombs(url: str) -> dict[str, tuple[dict[str, Answer], str]]:
    """Where a server compresses a bomb: its routes, and what the failure says."""
    realm = f"{url}/token"
    header = {
        "WWW-Authenticate": f'Bearer realm="{realm}",service="hostile",scope="repository:hostile/os:pull"'
    }
    token = send("200 OK", JSON, b'{"token": "t"}')
    return {
        "token answer": (
            {"/token": bomb("200 OK", JSON), "/v2/": challenge(realm)},
            f"token service {realm} sent more than {MAX_TOKEN_BYTES} bytes",
        ),
        "manifest": (
            {"/v2/": bomb("200 OK", MANIFEST)},
            f"manifest hostile/os:v1 from registry {url} (for ghcr.io) is over the {MAX_MANIFEST_BYTES} byte limit",
        ),
        "error page": (
            {"/v2/": bomb("500 Internal Server Error", JSON)},
            f"registry {url} (for ghcr.io) answered HTTP 500 for manifest hostile/os:v1",
        ),
        # httpx reads the bodies of 401 challenges and of redirects itself.
        "401 challenge": (
            {"/token": token, "/v2/": bomb("401 Unauthorized", header)},
            f"registry {url} (for ghcr.io) requires authentication",
        ),
        "redirect": (
            {
                "/v2/hostile/": bomb("307 Temporary Redirect", {"Location": "/v2/moved/manifests/v1"}),
                "/v2/": send("404 Not Found"),
            },
            f"manifest hostile/os:v1 not found at registry {url} (for ghcr.io)",
        ),
    }


@pytest.mark.parametrize("where", ["token answer", "manifest", "error page", "401 challenge", "redirect"])
def test_gzip_bombs_are_capped_as_decoded(
    servers: list[Hostile], tmp_path: Path, where: str, baseline: Callable[[list[str]], int]
) -> None:
    server = hostile(servers)
    server.routes, expected = _bombs(server.url)[where]
    root = project(tmp_path, server.url)
    assert_bounded(LOCK, root, [expected], baseline)
    assert_fails_fast(root, [expected])
    # Nothing compressed is asked for: only a server that ignores that sends a bomb.
    assert all(b"\r\naccept-encoding: identity\r\n" in head.lower() for head in server.heads)


# get_blob reads a config blob decoded, download_blob streams a layer to disk as sent: either
# way no more than the descriptor's size (and a piece) is taken before verification fails.
@pytest.mark.parametrize("method", ["get_blob", "download_blob"])
def test_gzip_bomb_blobs_are_capped_at_their_size(
    servers: list[Hostile], tmp_path: Path, method: str, baseline: Callable[[list[str]], int]
) -> None:
    server = hostile(servers)
    server.routes = {"/v2/": bomb("200 OK", {"Content-Type": "application/octet-stream"})}
    expected = [
        f"blob {DIGEST} of hostile/os ({DIGEST[7:19]}) from registry {server.url} (for ghcr.io) failed "
        "verification: more than the expected 1048576 bytes"
    ]
    assert_bounded(blob_command(server.url, method), tmp_path, expected, baseline)
    assert list(tmp_path.iterdir()) == []  # no blob, no part file


@pytest.mark.parametrize(
    ("coding", "body", "problem"),
    [
        ("br", b"{}", "its Content-Encoding 'br' was not asked for (identity was)"),
        ("gzip", b"{}", "its gzip encoding is corrupt"),
        (
            "gzip, gzip",
            gzip.compress(gzip.compress(b"{}")),
            "its Content-Encoding 'gzip, gzip' was not asked for",
        ),
    ],
    ids=["br", "corrupt gzip", "gzip twice"],
)
def test_a_manifest_in_an_unreadable_encoding_is_refused(
    servers: list[Hostile], tmp_path: Path, coding: str, body: bytes, problem: str
) -> None:
    server = hostile(servers)
    server.routes = {"/v2/": send("200 OK", {**MANIFEST, "Content-Encoding": coding}, body)}
    assert_fails_fast(
        project(tmp_path, server.url),
        [
            f"cannot fetch manifest hostile/os:v1 from registry {server.url} (for ghcr.io): "
            f"the server sent a body cocoonplan cannot read: {problem}"
        ],
    )


def test_a_manifest_compressed_anyway_is_read_decoded(servers: list[Hostile]) -> None:
    from cocoonplan.oci.registry import RegistryStore

    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 6}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST["Content-Type"], "config": config, "layers": []}
    content = json.dumps(manifest).encode()
    server = hostile(servers)
    server.routes = {"/v2/": send("200 OK", {**MANIFEST, "Content-Encoding": "gzip"}, gzip.compress(content))}
    with httpx.Client(timeout=5) as client:
        raw = RegistryStore("ghcr.io", server.url, client).get_manifest("hostile/os", "v1")
    assert raw.content == content
    assert raw.digest == "sha256:" + hashlib.sha256(content).hexdigest()
    assert b"\r\naccept-encoding: identity\r\n" in server.heads[0].lower()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return int(listener.getsockname()[1])


@pytest.mark.parametrize("failure", ["HTTP error", "no answer", "refused", "redirect"])
def test_a_mirror_password_is_never_shown(servers: list[Hostile], tmp_path: Path, failure: str) -> None:
    server = hostile(servers)
    closed = _closed_port()
    port = closed if failure == "refused" else server.port
    shown = f"registry http://***@127.0.0.1:{port} (for ghcr.io)"
    server.routes, expected = {
        "HTTP error": ({"/v2/": send("500 Internal Server Error")}, f"{shown} answered HTTP 500"),
        "no answer": ({"/v2/": hang}, f"timed out fetching manifest hostile/os:v1 from {shown}"),
        "refused": ({}, f"cannot fetch manifest hostile/os:v1 from {shown}: "),
        "redirect": (
            {
                "/v2/": send(
                    "307 Temporary Redirect", {"Location": f"http://robot:hunter2@127.0.0.1:{closed}/v2/x"}
                )
            },
            f"cannot fetch manifest hostile/os:v1 from {shown} at http://***@127.0.0.1:{closed}/v2/x: ",
        ),
    }[failure]
    tmp_path.joinpath("cocoonplan.yaml").write_text(
        PROJECT.format(endpoint=f"http://robot:hunter2@127.0.0.1:{port}", insecure="")
    )
    tmp_path.joinpath("vm.yaml").write_text(SPEC)
    printed = assert_fails_fast(tmp_path, [expected])
    assert "hunter2" not in printed
    assert "robot" not in printed
