"""A reverse proxy on loopback in front of a registry: counts requests, optionally delays each.

The plan benchmark points a project's registry mirror here, so every request a plan makes is
counted (the registry's own access log is off) and, with ``delay``, answered only after that
many seconds: a registry across a WAN, without leaving the machine. Upstream connections are
kept alive per thread, so the proxy adds little besides the delay.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}


class CountingProxy:
    """Forwards ``GET``/``HEAD`` to ``upstream`` (``host:port``); :attr:`requests` counts them
    and :attr:`log` keeps each (method, path), for tests that ask which blobs were fetched."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.requests = 0
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def reset(self, delay: float = 0.0) -> None:
        with self._lock:
            self.requests = 0
            self.log.clear()
            self.delay = delay

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.upstream, timeout=60)
            self._local.connection = connection
        return connection

    def _forward(self, method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        for attempt in range(2):  # an idle upstream connection may have been closed
            connection = self._connection()
            try:
                connection.request(method, path, headers=headers)
                return connection.getresponse()
            except (http.client.HTTPException, OSError):
                connection.close()
                self._local.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def finish(self) -> None:
                # One thread per client connection: its upstream connection ends with it.
                super().finish()
                connection = getattr(proxy._local, "connection", None)
                if connection is not None:
                    connection.close()
                    proxy._local.connection = None

            def do_GET(self) -> None:
                self._relay("GET")

            def do_HEAD(self) -> None:
                self._relay("HEAD")

            def _relay(self, method: str) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    proxy.log.append((method, self.path))
                    delay = proxy.delay
                if delay:
                    time.sleep(delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Host"] = proxy.upstream
                response = proxy._forward(method, self.path, headers)
                body = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length = response.getheader("Content-Length")
                self.send_header("Content-Length", length if method == "HEAD" and length else str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

        return Handler
