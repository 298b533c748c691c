"""Which content store serves each registry host, as the project file says.

For a registry host, in order:

* ``registries[host].layout``: an OCI image layout directory (relative to the project file);
* ``registries[host].mirror``: another distribution endpoint serving the same repositories
  (credentials are those of the mirror's host; a mirror written without a scheme gets one
  as below);
* otherwise the registry itself: ``https://host``, or ``http://host`` when the host is
  loopback (``127.0.0.0/8``, ``localhost``, ``[::1]``) or listed in ``insecure``. Docker
  Hub (``docker.io``) is served by ``registry-1.docker.io``.

Every store is wrapped in a :class:`CachingStore` over the project's one digest-addressed
cache (``project.cache``), and made once per host. The client's read timeout also bounds
each credential helper's run, so one setting bounds every wait on the outside world.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import httpx

from cocoonplan.context import ProjectContext
from cocoonplan.oci.cache import BlobCache, CachingStore
from cocoonplan.oci.credentials import HELPER_TIMEOUT_SECONDS, Credentials, load_credentials
from cocoonplan.oci.layout import LayoutStore
from cocoonplan.oci.reference import DOCKER_HUB
from cocoonplan.oci.registry import RegistryStore
from cocoonplan.oci.store import ContentStore

DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
"""Docker Hub's distribution API; ``docker.io`` itself only redirects browsers."""


def host_name(host: str) -> str:
    """``host`` without its port (and without the brackets of an IPv6 literal)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1``, with or without a port."""
    name = host_name(host).lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Sources:
    """The content stores of one project run, one per registry host, sharing one cache and client.

    Sources takes ownership of the httpx client given to :func:`open_sources`: :meth:`close`
    closes it. Credentials are looked up (and credential helpers run) only when a host's
    store is first needed.
    """

    def __init__(self, context: ProjectContext, client: httpx.Client, env: Mapping[str, str]) -> None:
        self.context = context
        self.cache = BlobCache(context.cache_directory())
        self._client = client
        self._env = dict(env)
        self._stores: dict[str, ContentStore] = {}

    def store_for(self, host: str) -> ContentStore:
        """The (cached) store for registry ``host``, chosen as described in the module docstring."""
        store = self._stores.get(host)
        if store is None:
            store = CachingStore(self._make_store(host), self.cache)
            self._stores[host] = store
        return store

    def endpoint_for(self, host: str) -> str:
        """The distribution endpoint URL that serves ``host`` when it has no layout or mirror."""
        if host == DOCKER_HUB:
            return DOCKER_HUB_ENDPOINT
        return f"{self._scheme(host)}://{host}"

    def close(self) -> None:
        """Forget the stores and close the HTTP client."""
        self._stores.clear()
        self._client.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _make_store(self, host: str) -> ContentStore:
        source = self.context.project.registries.get(host)
        if source is not None and source.layout is not None:
            return LayoutStore(self.context.resolve(source.layout), host)
        if source is not None and source.mirror is not None:
            endpoint = source.mirror.rstrip("/")
            if "://" not in endpoint:
                endpoint = f"{self._scheme(endpoint)}://{endpoint}"
            mirror_host = httpx.URL(endpoint).netloc.decode("ascii")
            return RegistryStore(host, endpoint, self._client, self._credentials(mirror_host))
        return RegistryStore(host, self.endpoint_for(host), self._client, self._credentials(host))

    def _credentials(self, host: str) -> Credentials | None:
        return load_credentials(host, self._env, self._client.timeout.read or HELPER_TIMEOUT_SECONDS)

    def _scheme(self, host: str) -> str:
        # Plain HTTP only where the project says so or the traffic never leaves the machine.
        return "http" if is_loopback(host) or host in self.context.project.insecure else "https"


def open_sources(context: ProjectContext, client: httpx.Client, env: Mapping[str, str]) -> Sources:
    """Build the :class:`Sources` of a project; ``env`` supplies DOCKER_CONFIG, HOME and PATH."""
    return Sources(context, client, env)
