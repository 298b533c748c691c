"""A content store over the OCI distribution HTTP API (registries and registry mirrors).

Guarantees:

* a manifest is returned with the sha256 of the exact bytes served; asked for by digest,
  those bytes must hash to it, and a ``Docker-Content-Digest`` header that names another
  sha256 digest is a mismatch too (DigestMismatchError);
* blobs are checked against the descriptor's digest and size; streamed downloads appear
  under ``dest`` only once verified, never half-written. :meth:`RegistryStore.open_blob` is
  the one exception: it streams raw bytes from an offset to a caller that verifies them
  itself while resuming (the blob executor);
* one request per fetch (plus at most one authentication round): no hidden retries, so a
  dead endpoint fails as fast as the connection does;
* every request, the token request included, carries the client's timeouts, and every fetch
  has an overall deadline (see :class:`Deadline`): a server that stalls or drips its answer
  fails the fetch instead of hanging it; every body has a size cap (manifests
  MAX_MANIFEST_BYTES, token answers MAX_TOKEN_BYTES, blobs their descriptor's size, error
  and redirect pages ERROR_BODY_LIMIT), counted as decoded: identity is asked for, and a body
  a server compresses anyway is inflated a piece at a time under the same cap, so a small
  compressed body cannot expand in memory (a blob streamed to disk is taken as sent, never
  inflated);
* a URL with a user name or password (a mirror's ``http://user:pass@host``) is shown as
  ``http://***@host`` in every message (see :func:`redact_userinfo`);
* every failure names what was fetched, from which endpoint, and what to do about it.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpcore
import httpx

from cocoonplan import bounded
from cocoonplan.errors import NotFoundError, RegistryError
from cocoonplan.model import sha256_digest
from cocoonplan.oci.authenticator import BODY_LIMIT, RAW_BODY, RegistryAuth
from cocoonplan.oci.credentials import Credentials
from cocoonplan.oci.manifest import ACCEPT_MANIFESTS, Descriptor, media_type_of
from cocoonplan.oci.store import (
    MAX_MANIFEST_BYTES,
    BlobBody,
    RawManifest,
    is_digest_selector,
    manifest_name,
)
from cocoonplan.oci.verifier import (
    CHUNK_SIZE,
    Verifier,
    require_sha256,
    verify_bytes,
    write_verified,
)

DEADLINE_FACTOR = 4
"""A fetch may take this many times the client's read timeout, plus time for the bytes it delivers."""
DEFAULT_TIMEOUT_SECONDS = 30.0
"""The timeout a deadline is derived from when the client has no read timeout."""
MIN_BYTES_PER_SECOND = 64 << 10
"""Each this many bytes delivered extend a fetch's deadline by a second: large blobs on slow links finish."""
ERROR_BODY_LIMIT = 64 << 10
"""Bodies other than a 200's (errors, 401 challenges, redirects) are read this far at most: only for messages."""
_DEADLINE = "cocoonplan.deadline"
"""Request extension: the :class:`Deadline` of the fetch the request belongs to."""
_NEW_STREAMS = ("connection.connect_tcp.complete", "connection.start_tls.complete")
"""httpcore trace events whose ``return_value`` is a newly opened connection's stream."""
_REQUEST_SENT = "http11.send_request_headers.started"
"""The httpcore trace event each request of a fetch starts with."""
DECODE_PIECE = 64 << 10
"""The most bytes one step of inflating a compressed body yields: a bomb grows a piece at a time."""
_ZLIB_WBITS = dict.fromkeys(("gzip", "x-gzip", "deflate"), zlib.MAX_WBITS | 32)
"""Content codings decoded here, and zlib's window bits for them (32: a gzip or zlib header, detected)."""
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_userinfo(text: str) -> str:
    """``text`` with the user name and password of every URL in it replaced by ``***``
    (``http://user:pass@host`` becomes ``http://***@host``); idempotent. Messages end up in CI
    logs and pull-request comments."""
    return _USERINFO.sub(r"\1***@", text)


class Deadline:
    """The time one fetch may take in all: connecting, its authentication round, redirects, every byte.

    httpx's timeouts bound each network operation, so a server sending a byte every second
    (of a body, a header or a chunk-size line) is never cut off by them. A fetch gets
    ``seconds``, plus one second for every MIN_BYTES_PER_SECOND bytes of body it has
    received: a drip fails after ``seconds`` whatever size it announces, a blob arriving at a
    useful rate is never cut off. A watchdog thread has ``watch`` shut down the sockets the
    fetch may be blocked on once the time is up; leaving the ``with`` block then raises
    RegistryError in place of whatever the interrupted read raised.
    """

    def __init__(self, seconds: float, what: str, source: str, watch: _Watch) -> None:
        self.seconds = seconds
        self.what = what
        self.source = source
        self.received = 0
        """Body bytes received so far (counted by the responses' streams)."""
        self.url = ""
        """The URL of the request in progress (the registry's, a token realm's, a redirect's)."""
        self._watch = watch
        self._started = time.monotonic()
        self._done = threading.Event()
        self._expired = threading.Event()

    def __enter__(self) -> Deadline:
        threading.Thread(target=self._expire, name="cocoonplan-deadline", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        if self._expired.is_set():
            # Replaces the error of the interrupted read (chained as its context), or a body
            # that merely looked complete because its connection was shut down.
            elapsed = time.monotonic() - self._started
            raise RegistryError(
                f"fetching {self.what} from {self.source} took too long: still waiting on {self.url} "
                f"after {elapsed:.1f} s ({self.received} bytes received)",
                hint=f"the server stalls or drips its answer; fix it or read from a mirror or layout, or allow "
                f"more time with COCOONPLAN_TIMEOUT (a fetch gets {DEADLINE_FACTOR} times it, plus a second "
                f"per {MIN_BYTES_PER_SECOND >> 10} KiB received)",
            )

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore ``trace`` callback: note each request's URL, have ``watch`` note each new connection."""
        if event == _REQUEST_SENT:
            self.url = bytes(info["request"].url).decode("ascii", "replace")
        elif event in _NEW_STREAMS:
            self._watch.add(info["return_value"])

    def _expire(self) -> None:
        while True:
            allowed = self.seconds + self.received / MIN_BYTES_PER_SECOND
            remaining = allowed - (time.monotonic() - self._started)
            if remaining <= 0:
                break
            if self._done.wait(remaining):
                return
        self._expired.set()
        self._watch.interrupt()


class _Watch:
    """The response hook RegistryStore adds to a client, once, shared by every store using it.

    It caps the body of every response of a fetch, including the 401 challenges and
    redirects whose bodies httpx reads itself, and counts it against the fetch's deadline;
    requests of others are left alone. A body with a Content-Encoding is decoded by the
    stream it installs, under the cap, and the header removed so that httpx, whose decoders
    inflate a whole network read at once (a thousandfold for zeros), does not decode it
    again; only a successful answer to a :data:`RAW_BODY` request is left encoded. It also holds every connection the fetches opened,
    so that :meth:`interrupt` can stop a fetch wherever it waits, also on a connection an
    earlier fetch (of any store on the client) left in the pool.
    """

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[httpcore.NetworkStream] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __call__(self, response: httpx.Response) -> None:
        deadline = response.request.extensions.get(_DEADLINE)
        if isinstance(deadline, Deadline) and isinstance(response.stream, httpx.SyncByteStream):
            ok = response.status_code in (httpx.codes.OK, httpx.codes.PARTIAL_CONTENT)
            limit = response.request.extensions[BODY_LIMIT] if ok else ERROR_BODY_LIMIT
            coding = None
            if not (ok and response.request.extensions.get(RAW_BODY)):
                codings = [c.strip().lower() for c in response.headers.get_list("content-encoding", True)]
                coding = ", ".join(c for c in codings if c not in ("", "identity"))
                if coding:
                    del response.headers["content-encoding"]
            response.stream = _BoundedStream(response.stream, deadline, limit, coding or None, strict=ok)

    def add(self, stream: httpcore.NetworkStream) -> None:
        """Hold ``stream`` (weakly: the pool decides how long it lives)."""
        with self._lock:
            self._streams.add(stream)

    def interrupt(self) -> None:
        """Shut down every connection the fetches opened: a blocked read or write returns at once.

        Idle pooled connections go too; httpcore sees them closed and opens new ones.
        """
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if isinstance(sock, socket.socket):
                # socket.socket's own shutdown, not SSLSocket's, which would also drop its
                # TLS state under a read in progress in another thread.
                with contextlib.suppress(OSError):  # already closed, or detached by TLS
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _BoundedStream(httpx.SyncByteStream):
    """A response body counted against its fetch's deadline that ends one piece past ``limit``.

    With a content ``coding`` the body is inflated here, at most DECODE_PIECE bytes per step,
    and ``limit`` counts the decoded bytes; the bytes received may exceed it by no more than
    deflate can grow data (about 0.01%) before the body ends too, so an endless stream of empty
    blocks is cut off as well. Ending (not failing) is enough: whoever reads a body that
    matters compares its length with the limit and reports it (a blob's Verifier, the
    manifest and token readers), and the bodies httpx reads itself (401 challenges,
    redirects) are discarded anyway. A coding that cannot be decoded fails a ``strict`` body
    (a successful answer) with httpx.DecodingError and ends any other.
    """

    def __init__(
        self, inner: httpx.SyncByteStream, deadline: Deadline, limit: int, coding: str | None, *, strict: bool
    ) -> None:
        self._inner = inner
        self._deadline = deadline
        self._limit = limit
        self._coding = coding
        self._strict = strict

    def __iter__(self) -> Iterator[bytes]:
        if self._coding is None:
            yield from self._received(self._limit)
            return
        wbits = _ZLIB_WBITS.get(self._coding)
        if wbits is None:
            self._undecodable(f"its Content-Encoding {self._coding!r} was not asked for (identity was)")
            return
        inflater = zlib.decompressobj(wbits)
        total = 0
        try:
            for chunk in self._received(self._limit + self._limit // 1024 + DECODE_PIECE):
                data = chunk
                while True:
                    piece = inflater.decompress(data, DECODE_PIECE)
                    data = inflater.unconsumed_tail
                    if piece:
                        total += len(piece)
                        yield piece
                    if total > self._limit or inflater.eof:
                        return  # what follows a complete body is ignored, as httpx does
                    if not data and len(piece) < DECODE_PIECE:
                        break  # this chunk is used up and nothing is pending
        except zlib.error as exc:
            self._undecodable(f"its {self._coding} encoding is corrupt ({exc})")

    def _received(self, limit: int) -> Iterator[bytes]:
        total = 0
        for chunk in self._inner:
            self._deadline.received += len(chunk)
            total += len(chunk)
            yield chunk
            if total > limit:
                return

    def _undecodable(self, problem: str) -> None:
        if self._strict:
            raise httpx.DecodingError(f"the server sent a body cocoonplan cannot read: {problem}")

    def close(self) -> None:
        self._inner.close()


class RegistryStore:
    """Read manifests and blobs of registry ``host`` from the distribution API at ``endpoint``.

    ``endpoint`` is the base URL (``https://ghcr.io``, ``http://127.0.0.1:5000``, a mirror);
    ``host`` is the canonical registry the content belongs to, used in messages. The httpx
    client is injected and not owned: its timeouts apply, a fetch's deadline is derived from
    its read timeout, and the caller closes it; a response hook is added to it that acts on
    this class's requests only. Redirects are followed (registries hand blobs off to storage);
    httpx drops the Authorization header when a redirect leaves the registry's origin.
    """

    def __init__(
        self, host: str, endpoint: str, client: httpx.Client, credentials: Credentials | None = None
    ) -> None:
        self.host = host
        self.endpoint = endpoint.rstrip("/")
        self._shown = redact_userinfo(self.endpoint)
        """The endpoint as messages show it: without a user name or password."""
        self._client = client
        self.credentials = credentials
        self._auth = RegistryAuth(host, credentials)
        self._deadline_seconds = DEADLINE_FACTOR * (client.timeout.read or DEFAULT_TIMEOUT_SECONDS)
        hooks = client.event_hooks
        watch = next((hook for hook in hooks["response"] if isinstance(hook, _Watch)), None)
        if watch is None:
            watch = _Watch()
            client.event_hooks = {**hooks, "response": [*hooks["response"], watch]}
        self._watch = watch

    def describe(self) -> str:
        """``registry <endpoint>``, plus the canonical host when the endpoint is a mirror."""
        if self.endpoint.split("://", 1)[-1] == self.host:
            return f"registry {self._shown}"
        return f"registry {self._shown} (for {self.host})"

    def get_manifest(self, repository: str, selector: str) -> RawManifest:
        """Fetch a manifest or index by tag or digest, verified as described in the module docstring."""
        what = f"manifest {manifest_name(repository, selector)}"
        if is_digest_selector(selector):
            require_sha256(selector, what)
        url = f"{self.endpoint}/v2/{repository}/manifests/{selector}"
        with self._open(url, what, MAX_MANIFEST_BYTES, accept=ACCEPT_MANIFESTS) as response:
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
                raise RegistryError(
                    f"{what} from {self.describe()} is {declared} bytes, "
                    f"over the {MAX_MANIFEST_BYTES} byte limit",
                    hint="this is not a manifest cocoonplan can use; check the reference",
                )
            content = self._read_limited(response, MAX_MANIFEST_BYTES, what)
            header_digest = response.headers.get("docker-content-digest", "")
            content_type = response.headers.get("content-type")
        digest = sha256_digest(content)
        if is_digest_selector(selector):
            verify_bytes(content, Verifier(selector, None, what, self.describe()))
        # Only a sha256 header can be compared; registries may legitimately announce other algorithms.
        if header_digest.startswith("sha256:") and header_digest != digest:
            verify_bytes(
                content, Verifier(header_digest, None, f"{what} (Docker-Content-Digest)", self.describe())
            )
        return RawManifest(
            digest=digest, media_type=media_type_of(content, content_type, what), content=content
        )

    def get_blob(self, repository: str, descriptor: Descriptor) -> bytes:
        """Return a small blob's bytes, verified against the descriptor's digest and size.

        Reading stops within one chunk past the descriptor's size, so a registry serving a
        longer (or endless) body cannot make this read without bound.
        """
        what = f"blob {descriptor.digest} of {repository}"
        with self._open(self._blob_url(repository, descriptor), what, descriptor.size) as response:
            content = self._read_limited(response, descriptor.size, what, verify=True)
        return verify_bytes(content, Verifier(descriptor.digest, descriptor.size, what, self.describe()))

    def download_blob(self, repository: str, descriptor: Descriptor, dest: Path) -> None:
        """Stream a blob to ``dest`` through ``dest`` + ``.part``, verified, then renamed.

        On failure (HTTP, network, digest or size mismatch, interrupt) the part file is removed
        and ``dest`` is not touched.
        """
        what = f"blob {descriptor.digest} of {repository}"
        verifier = Verifier(descriptor.digest, descriptor.size, what, self.describe())
        # The raw body, undecoded: identity is asked for, and a blob's digest is over its
        # stored bytes, so an encoded body fails verification instead of being trusted; it is
        # never inflated, so it counts against the size as sent. Skipping httpx's decoder and
        # re-chunker measured 1.4x faster (bench/registry_pull.py).
        url = self._blob_url(repository, descriptor)
        with self._open(url, what, descriptor.size, raw=True) as response:
            write_verified(dest, response.iter_raw(), verifier)

    @contextlib.contextmanager
    def open_blob(self, repository: str, descriptor: Descriptor, offset: int = 0) -> Iterator[BlobBody]:
        """Stream a blob's raw bytes from ``offset`` (a ``Range: bytes=N-`` request), unverified.

        A server that ignores the range answers 200 with the whole blob (``start`` 0); a 206
        for another range than the one asked is a RegistryError. The fetch has its deadline
        and its body the descriptor's size as cap, as every other.
        """
        what = f"blob {descriptor.digest} of {repository}"
        url = self._blob_url(repository, descriptor)
        with self._open(url, what, descriptor.size, raw=True, offset=offset) as response:
            start = 0
            if response.status_code == httpx.codes.PARTIAL_CONTENT:
                served = response.headers.get("content-range", "")
                if not served.startswith(f"bytes {offset}-"):
                    raise RegistryError(
                        f"{self.describe()} answered the request for {what} from byte {offset} "
                        f"with another range ({served or 'no Content-Range'})",
                        hint=f"the registry at {self._shown} mishandles ranged requests; use a mirror",
                    )
                start = offset
            yield BlobBody(start=start, chunks=response.iter_raw())

    def _blob_url(self, repository: str, descriptor: Descriptor) -> str:
        return f"{self.endpoint}/v2/{repository}/blobs/{descriptor.digest}"

    @contextlib.contextmanager
    def _open(
        self,
        url: str,
        what: str,
        limit: int,
        accept: str | None = None,
        *,
        raw: bool = False,
        offset: int = 0,
    ) -> Iterator[httpx.Response]:
        """GET ``url`` (from byte ``offset`` when not 0) as a stream under a new :class:`Deadline`,
        its body capped near ``limit`` bytes (undecoded when ``raw``); turn HTTP and transport
        failures into errors naming ``what`` and the URL that failed."""
        headers = {"Accept-Encoding": "identity"}
        if accept:
            headers["Accept"] = accept
        answers = {httpx.codes.OK}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            answers.add(httpx.codes.PARTIAL_CONTENT)
        deadline = Deadline(self._deadline_seconds, what, self.describe(), self._watch)
        extensions = {_DEADLINE: deadline, BODY_LIMIT: limit, RAW_BODY: raw, "trace": deadline.trace}
        try:
            with (
                deadline,
                self._client.stream(
                    "GET", url, headers=headers, auth=self._auth, follow_redirects=True, extensions=extensions
                ) as response,
            ):
                if response.status_code not in answers:
                    response.read()
                    # The status as the cause, so that is_transient can tell a 503 from a 404.
                    cause = httpx.HTTPStatusError(
                        f"HTTP {response.status_code}", request=response.request, response=response
                    )
                    raise self._status_error(response, what) from cause
                yield response
        except httpx.TimeoutException as exc:
            failed = _failed_url(exc, url)
            raise RegistryError(
                f"timed out fetching {what} from {self.describe()}{_at(failed, url)} ({type(exc).__name__})",
                hint=f"check the network path to {failed.scheme}://{failed.netloc.decode('ascii')}, allow more "
                f"time with COCOONPLAN_TIMEOUT, or read {self.host} from a mirror or layout configured under "
                "registries: in cocoonplan.yaml",
            ) from exc
        except httpx.HTTPError as exc:
            raise RegistryError(
                f"cannot fetch {what} from {self.describe()}{_at(_failed_url(exc, url), url)}: "
                f"{redact_userinfo(str(exc)) or type(exc).__name__}",
                hint=self._transport_hint(exc),
            ) from exc

    def _transport_hint(self, exc: httpx.HTTPError) -> str:
        if self.endpoint.startswith("https://") and "SSL" in str(exc).upper():
            return (
                f"if {self.host} serves plain HTTP, list it under insecure: in cocoonplan.yaml; "
                "otherwise check its TLS certificate"
            )
        return (
            f"check that a registry is listening at {self._shown}, or point registries.{self.host} "
            "at a reachable mirror or layout in cocoonplan.yaml"
        )

    def _status_error(self, response: httpx.Response, what: str) -> RegistryError | NotFoundError:
        status = response.status_code
        detail = _error_detail(response)
        if status == httpx.codes.NOT_FOUND:
            return NotFoundError(
                f"{what} not found at {self.describe()}",
                detail=detail,
                hint="check the repository, tag and digest in the reference, or that it was pushed to this "
                "registry",
            )
        if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            if self.credentials is None:
                problem = "requires authentication and no credentials are configured"
                hint = (
                    f"log in with `docker login {self.host}` or add credentials for {self.host} to "
                    "$DOCKER_CONFIG/config.json (else ~/.docker/config.json); some registries also answer "
                    "this way for repositories that do not exist"
                )
            else:
                problem = f"refused the credentials for user {self.credentials.username}"
                hint = (
                    f"check the credentials for {self.host} in the docker config, or that this user may "
                    "read the repository"
                )
            return RegistryError(
                f"{self.describe()} {problem} (HTTP {status}) when fetching {what}", detail=detail, hint=hint
            )
        if status == httpx.codes.TOO_MANY_REQUESTS:
            hint = f"the registry is rate limiting; wait, log in to {self.host}, or use a mirror"
        elif status >= httpx.codes.INTERNAL_SERVER_ERROR:
            hint = f"the registry at {self._shown} failed; try again later or use a mirror"
        else:
            hint = f"check that {self._shown} is an OCI distribution registry"
        return RegistryError(f"{self.describe()} answered HTTP {status} for {what}", detail=detail, hint=hint)

    def _read_limited(
        self, response: httpx.Response, limit: int, what: str, *, verify: bool = False
    ) -> bytes:
        """Read the body, stopping within a chunk past ``limit``: too long a body is noticed, not buffered."""
        chunks: list[bytes] = []
        total = 0
        for chunk in response.iter_bytes(CHUNK_SIZE):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                if verify:
                    break  # the caller's size check reports the mismatch
                raise RegistryError(
                    f"{what} from {self.describe()} is over the {limit} byte limit",
                    hint="this is not a manifest cocoonplan can use; check the reference",
                )
        return b"".join(chunks)


def is_transient(error: BaseException) -> bool:
    """Whether a failed fetch may succeed when tried again: the connection failed, was dropped
    or timed out (also by the fetch's deadline, which interrupts a read), or the server
    answered 5xx. Anything else (404, 401, a mismatch) fails the same way again."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, httpx.HTTPStatusError):
        return cause.response.status_code >= httpx.codes.INTERNAL_SERVER_ERROR
    return isinstance(cause, httpx.TransportError)


def _failed_url(exc: httpx.HTTPError, url: str) -> httpx.URL:
    """The URL of the request that failed: ``url``, a token realm's or a redirect's."""
    try:
        return exc.request.url
    except RuntimeError:  # httpx sets the request of every error raised while sending; not of all others
        return httpx.URL(url)


def _at(failed: httpx.URL, url: str) -> str:
    """`` at FAILED`` when the request that failed is not ``url`` itself."""
    return "" if failed == httpx.URL(url) else f" at {redact_userinfo(str(failed))}"


def _error_detail(response: httpx.Response) -> str:
    """Summarise a distribution error body (``{"errors": [{"code", "message"}]}``) in one line."""
    try:
        errors = bounded.loads(response.content).get("errors") or []
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)
        ]
    except (ValueError, AttributeError):
        parts = []
    return "; ".join(parts)
