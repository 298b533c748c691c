"""Registry authentication as an httpx auth flow: Docker/OCI bearer tokens and HTTP basic.

The flow reacts to what the registry asks for in its 401 ``WWW-Authenticate`` challenge:

* ``Bearer realm=...,service=...,scope=...``: GET a token from the realm with the service
  and scope as query parameters (basic-authenticated with the credentials, when there are
  any, anonymous otherwise), read ``token`` or ``access_token``, cache it per scope until
  ``expires_in`` runs out, and retry the request once with it;
* ``Basic realm=...``: retry once with the credentials, and send them up front from then on.

Each request is retried at most once; there is no retry loop. A token endpoint that refuses,
or answers with anything but a bearer token (RFC 6750's ``b64token``: ASCII letters, digits,
``-._~+/`` and trailing ``=``, so nothing that could not or should not go into a header),
raises RegistryError naming the realm and the scope; the token itself is never shown.

The token request is part of the request it authenticates: it carries that request's
extensions (the client's timeouts and the registry store's deadline), with its own body
limit under :data:`BODY_LIMIT`; it asks for an unencoded answer, and its body is decoded
(under that limit) whatever :data:`RAW_BODY` says for the request it authenticates. A realm
is used only when credentials may be sent there (see :meth:`RegistryAuth.realm_url`).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Generator
from dataclasses import dataclass

import httpx

from cocoonplan.bounded import loads
from cocoonplan.errors import RegistryError
from cocoonplan.oci.credentials import Credentials

DEFAULT_TOKEN_SECONDS = 60
"""Token lifetime when the token endpoint does not say (the distribution token spec's default)."""
_EXPIRY_MARGIN_SECONDS = 5
MAX_TOKEN_BYTES = 1 << 20
"""The largest token answer read: registry tokens are JWTs of a few KiB."""
BODY_LIMIT = "cocoonplan.body_limit"
"""Request extension: the most bytes a successful answer to the request may have (decoded)."""
RAW_BODY = "cocoonplan.raw_body"
"""Request extension: True to take a successful answer's body as sent, never decoding it."""
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
"""RFC 6750's ``b64token``, the syntax of a bearer token in an Authorization header."""
# Greedy name and anchored tail: a repository may itself contain a "blobs" or "manifests" component.
_REPOSITORY_PATH = re.compile(r"^/v2/(?P<name>.+)/(?:manifests/[^/]+|blobs/[^/]+|tags/list)$")


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge."""

    scheme: str
    """Lower-cased auth scheme: ``bearer`` or ``basic`` (others are ignored)."""
    params: dict[str, str]


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values into challenges.

    Parameter values may be quoted and may contain commas (``scope="repository:a:pull,push"``),
    so the header is tokenised: a bare token not followed by ``=`` starts a new challenge,
    ``key=value`` adds a parameter to the current one.
    """
    challenges: list[Challenge] = []
    for header in headers:
        current: Challenge | None = None
        position, length = 0, len(header)
        while position < length:
            while position < length and header[position] in " \t,":
                position += 1
            start = position
            while position < length and header[position] not in " \t,=":
                position += 1
            token = header[start:position]
            while position < length and header[position] in " \t":
                position += 1
            if position < length and header[position] == "=":
                value, position = _parameter_value(header, position + 1)
                if current is not None and token:
                    current.params[token.lower()] = value
            elif token:
                current = Challenge(scheme=token.lower(), params={})
                challenges.append(current)
    return challenges


def _parameter_value(header: str, position: int) -> tuple[str, int]:
    """Read a quoted-string or bare parameter value starting at ``position``."""
    while position < len(header) and header[position] in " \t":
        position += 1
    if position < len(header) and header[position] == '"':
        value: list[str] = []
        position += 1
        while position < len(header) and header[position] != '"':
            if header[position] == "\\" and position + 1 < len(header):
                position += 1
            value.append(header[position])
            position += 1
        return "".join(value), position + 1
    start = position
    while position < len(header) and header[position] != ",":
        position += 1
    return header[start:position].strip(), position


def basic_header(credentials: Credentials) -> str:
    """The ``Authorization`` value for HTTP basic auth with ``credentials``."""
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def pull_scope(url: httpx.URL) -> str | None:
    """The token scope a registry asks for when reading ``url``, derived from its path."""
    match = _REPOSITORY_PATH.match(url.path)
    return f"repository:{match.group('name')}:pull" if match else None


class RegistryAuth(httpx.Auth):
    """Authenticate requests to one registry host; holds the token cache for that host.

    Credentials are sent only in response to a challenge (or, for basic auth, after one was
    seen), so anonymous registries never receive them.
    """

    def __init__(self, host: str, credentials: Credentials | None) -> None:
        self.host = host
        self.credentials = credentials
        self._tokens: dict[str, tuple[str, float]] = {}
        self._basic_challenged = False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send ``request``, answering at most one 401 challenge with a token or basic credentials."""
        scope = pull_scope(request.url)
        sent_token = self._cached_token(scope) if scope else None
        if sent_token:
            request.headers["Authorization"] = f"Bearer {sent_token}"
        elif self._basic_challenged and self.credentials is not None:
            request.headers["Authorization"] = basic_header(self.credentials)
        response = yield request
        if response.status_code != httpx.codes.UNAUTHORIZED:
            return
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None and "realm" in bearer.params:
            key = scope or bearer.params.get("scope", "")
            self._tokens.pop(key, None)
            token_response = yield self._token_request(bearer, request)
            token_response.read()
            token = self._accept_token(token_response, bearer, key)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
        elif any(c.scheme == "basic" for c in challenges) and self.credentials is not None:
            if "Authorization" in request.headers:
                return  # these credentials were just refused; asking again cannot help
            self._basic_challenged = True
            request.headers["Authorization"] = basic_header(self.credentials)
            yield request

    def _cached_token(self, scope: str) -> str | None:
        cached = self._tokens.get(scope)
        if cached is None:
            return None
        token, expires = cached
        if time.monotonic() >= expires:
            del self._tokens[scope]
            return None
        return token

    def _token_request(self, challenge: Challenge, request: httpx.Request) -> httpx.Request:
        params = {key: challenge.params[key] for key in ("service", "scope") if challenge.params.get(key)}
        # copy_merge_params keeps any query the realm already carries (params= would replace it).
        url = self.realm_url(challenge.params["realm"], request.url).copy_merge_params(params)
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if self.credentials is not None:
            headers["Authorization"] = basic_header(self.credentials)
        # A request made here gets none of the client's settings: without the original's
        # extensions it would wait forever on a realm that accepts and never answers.
        extensions = {**request.extensions, BODY_LIMIT: MAX_TOKEN_BYTES, RAW_BODY: False}
        return httpx.Request("GET", url, headers=headers, extensions=extensions)

    def realm_url(self, realm: str, registry: httpx.URL) -> httpx.URL:
        """The token endpoint a challenge from ``registry`` names, if credentials may be sent there.

        It must be an absolute http(s) URL with a host and no user name or password, and https
        whenever the registry is (an http realm is accepted only from a registry cocoonplan
        already reaches over plain HTTP: loopback or ``insecure``). Other hosts are allowed:
        Docker Hub's realm is auth.docker.io and GitLab's is gitlab.com, and a registry that
        could ask for the credentials with Basic gains nothing by naming another host.
        """
        origin = f"{registry.scheme}://{registry.netloc.decode('ascii')}"
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            problem, hint = "is not an absolute http(s) URL", "the registry's auth configuration is broken"
        elif url.userinfo:
            realm = str(url.copy_with(userinfo=b""))  # never repeat the embedded password
            problem, hint = "carries a user name or password", "the registry's auth configuration is broken"
        elif url.scheme == "http" and registry.scheme == "https":
            problem = f"is plain HTTP, so the credentials for {self.host} would leave TLS"
            hint = (
                f"serve the token endpoint over https; or, when {self.host} and its token endpoint are "
                "only reachable over plain HTTP anyway, list it under insecure: in cocoonplan.yaml"
            )
        else:
            return url
        raise RegistryError(
            f"refusing the token realm {realm!r} named by {origin} for {self.host}: it {problem}",
            hint=f"{hint}; read {self.host} from a mirror or layout under registries: in cocoonplan.yaml",
        )

    def _accept_token(self, response: httpx.Response, challenge: Challenge, key: str) -> str:
        realm = challenge.params["realm"]
        scope = challenge.params.get("scope", "(none)")
        if response.status_code != httpx.codes.OK:
            who = f"as {self.credentials.username}" if self.credentials else "anonymously"
            raise RegistryError(
                f"token service {realm} refused a token for {self.host} scope {scope} "
                f"{who} (HTTP {response.status_code})",
                hint=f"check the credentials for {self.host} in the docker config "
                "($DOCKER_CONFIG/config.json or ~/.docker/config.json), "
                f"e.g. with `docker login {self.host}`",
            )
        if len(response.content) > MAX_TOKEN_BYTES:
            raise RegistryError(
                f"token service {realm} sent more than {MAX_TOKEN_BYTES} bytes for {self.host} scope {scope}",
                hint="the token endpoint must return a small JSON document; check the registry's auth setup",
            )
        try:
            body = loads(response.content)  # depth-limited; its InputLimitError is a ValueError
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError, TypeError, OverflowError) as exc:
            raise RegistryError(
                f"token service {realm} returned an unreadable answer for {self.host} scope {scope}",
                hint="the token endpoint must return JSON with token or access_token",
            ) from exc
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"token service {realm} returned no token for {self.host} scope {scope}",
                hint="the token endpoint must return JSON with token or access_token",
            )
        if not _BEARER_TOKEN.fullmatch(token):
            # Never shown: it may be a real token with a stray character, and it goes nowhere.
            raise RegistryError(
                f"token service {realm} returned a token for {self.host} scope {scope} that is not a "
                "bearer token (RFC 6750 allows ASCII letters, digits, -._~+/ and trailing =)",
                hint="the token endpoint must return a bearer token; check the registry's auth setup",
            )
        self._tokens[key] = (token, time.monotonic() + max(lifetime - _EXPIRY_MARGIN_SECONDS, 0))
        return token
