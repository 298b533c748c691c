"""Registry credentials, read from the docker client configuration the way other OCI tools read it.

Lookup order for a host, as the docker CLI does it:

1. ``credHelpers[host]``: run ``docker-credential-<helper> get``;
2. ``credsStore``: the same with the default helper (a helper answering "credentials not
   found" falls through to 3, so a store-wide helper does not break anonymous pulls);
3. ``auths[host]``: inline ``auth`` (base64 ``user:password``), ``username``/``password``,
   or ``identitytoken`` (used as the password of the user ``<token>``).

``auths`` keys match when written as ``host``, ``https://host``, ``http://host`` or with a
path such as ``https://host/v1/``; Docker Hub (``docker.io``) also matches the keys docker
itself writes for it (``https://index.docker.io/v1/``, ``index.docker.io``,
``registry-1.docker.io``).

The configuration file is ``$DOCKER_CONFIG/config.json``, else ``$HOME/.docker/config.json``.
Both come from the ``env`` mapping the caller passes, never from ``os.environ``, so what is
read is decided by the caller (and by tests).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from cocoonplan.bounded import InputLimitError, loads, read_limited
from cocoonplan.errors import RegistryError
from cocoonplan.model import Model

DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_HELPER_KEY = "https://index.docker.io/v1/"
"""The server URL docker stores Docker Hub credentials under, in helpers and in ``auths``."""
IDENTITY_TOKEN_USER = "<token>"
"""The user name docker pairs with an identity token."""
HELPER_TIMEOUT_SECONDS = 30.0
"""A credential helper that hangs (waiting for a keychain prompt, say) fails instead of blocking forever."""
HELPER_OUTPUT_LIMIT = 1 << 20
"""The most a credential helper may print (stdout and stderr together); its answer is a few KiB."""
MAX_CONFIG_BYTES = 4 << 20
"""Largest docker config file read; real ones are a few KiB."""
_NOT_FOUND_MESSAGE = "credentials not found"


class Credentials(Model):
    """A user name and password (or token) for one registry host; the password never appears in repr/str."""

    username: str
    password: str = Field(repr=False)


def config_path(env: Mapping[str, str]) -> Path | None:
    """The docker config file named by ``env``.

    ``$DOCKER_CONFIG/config.json``, else ``$HOME/.docker/config.json``; None without either variable.
    """
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    if env.get("HOME"):
        return Path(env["HOME"]) / ".docker" / "config.json"
    return None


def load_credentials(
    host: str, env: Mapping[str, str], helper_timeout: float = HELPER_TIMEOUT_SECONDS
) -> Credentials | None:
    """Return the credentials configured for registry ``host``, or None when there are none.

    A missing config file means no credentials. A config file that is not valid JSON, or a
    matching entry that cannot be decoded, raises RegistryError naming the file; a credential
    helper that is missing or fails (or runs longer than ``helper_timeout`` seconds) raises
    RegistryError naming the helper and the host.
    """
    path = config_path(env)
    if path is None or not path.is_file():
        return None
    config = _read_config(path)
    helper = _helper_for(config, host, path)
    if helper is not None:
        found = _run_helper(helper, host, env, helper_timeout)
        if found is not None:
            return found
    entry = _auth_entry(config, host, path)
    if entry is None:
        return None
    return _decode_entry(entry, host, path)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = loads(read_limited(path, MAX_CONFIG_BYTES))
    except (OSError, InputLimitError) as exc:
        raise RegistryError(
            f"cannot read docker config {path}: {exc}",
            hint="fix or remove the file, or point DOCKER_CONFIG at a directory with a valid config.json",
        ) from exc
    if not isinstance(data, dict):
        raise RegistryError(
            f"docker config {path} is not a JSON object",
            hint="fix or remove the file, or point DOCKER_CONFIG at a directory with a valid config.json",
        )
    return data


def _section(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"docker config {path}: {key!r} is not a JSON object", hint="fix the file")
    return value


def _host_of_key(key: str) -> str:
    """Reduce an ``auths``/``credHelpers`` key (``https://host/v1/``) to its host (``host``)."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def _aliases(host: str) -> tuple[str, ...]:
    return DOCKER_HUB_ALIASES if host in DOCKER_HUB_ALIASES else (host,)


def _lookup(section: dict[str, Any], host: str) -> Any:
    """Find ``host`` in a config section: exact key first, then keys written as URLs."""
    if host in section:
        return section[host]
    aliases = _aliases(host)
    for key, value in section.items():
        if _host_of_key(key) in aliases:
            return value
    return None


def _helper_for(config: dict[str, Any], host: str, path: Path) -> str | None:
    helper = _lookup(_section(config, "credHelpers", path), host)
    if helper is None:
        helper = config.get("credsStore")
    if helper is None or helper == "":
        return None
    if not isinstance(helper, str):
        raise RegistryError(f"docker config {path}: the credential helper for {host} is not a string")
    return helper


def _helper_server(host: str) -> str:
    # Docker stores Docker Hub credentials under its legacy index URL, not under docker.io.
    return DOCKER_HUB_HELPER_KEY if host in DOCKER_HUB_ALIASES else host


def _run_helper(helper: str, host: str, env: Mapping[str, str], timeout: float) -> Credentials | None:
    program = f"docker-credential-{helper}"
    # os.defpath, not os.environ's PATH, when the mapping has none: only ``env`` decides.
    binary = shutil.which(program, path=env.get("PATH", os.defpath))
    hint = f"install {program}, or change credHelpers/credsStore in the docker config"
    if binary is None:
        raise RegistryError(f"credential helper {program} for {host} is not on PATH", hint=hint)
    try:
        result = _call_helper([binary, "get"], _helper_server(host), env, timeout)
    except subprocess.TimeoutExpired as exc:
        raise RegistryError(
            f"credential helper {program} did not answer for {host} within {timeout:g} s",
            hint=f"check `{program} get` by hand (it may wait for a keychain prompt), "
            "or allow more time with COCOONPLAN_TIMEOUT",
        ) from exc
    except _OutputLimitError as exc:
        raise RegistryError(
            f"credential helper {program} printed more than {HELPER_OUTPUT_LIMIT} bytes for {host}",
            hint=f"check `{program} get` by hand: it must print a JSON object with Username and Secret",
        ) from exc
    except OSError as exc:
        raise RegistryError(f"credential helper {program} failed for {host}: {exc}", hint=hint) from exc
    if result.returncode != 0:
        message = (result.stdout.strip() or result.stderr.strip())[:500]
        if _NOT_FOUND_MESSAGE in message.lower():
            return None
        raise RegistryError(
            f"credential helper {program} failed for {host} (exit {result.returncode})",
            detail=message,
            hint=f"check `{program} get` by hand, or log in again with `docker login {host}`",
        )
    try:
        answer = loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (InputLimitError, KeyError, TypeError) as exc:
        raise RegistryError(
            f"credential helper {program} returned an unreadable answer for {host}",
            hint="it must print a JSON object with Username and Secret",
        ) from exc
    if not isinstance(username, str) or not isinstance(secret, str):
        raise RegistryError(f"credential helper {program} returned non-string credentials for {host}")
    if not secret:
        return None
    return Credentials(username=username, password=secret)


class _OutputLimitError(Exception):
    """A credential helper printed more than HELPER_OUTPUT_LIMIT bytes."""


def _call_helper(
    argv: list[str], server: str, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a helper as ``subprocess.run(argv, input=server, capture_output=True, text=True)``
    would, but bounded: killed once it runs ``timeout`` seconds (TimeoutExpired) or prints
    more than HELPER_OUTPUT_LIMIT bytes (_OutputLimitError), since ``run`` buffers all output."""
    deadline = time.monotonic() + timeout
    stdout, stderr = bytearray(), bytearray()
    # Unbuffered, so a helper that exits without reading its input fails the write, not a later flush.
    process = subprocess.Popen(
        argv, bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env)
    )
    with process, selectors.DefaultSelector() as selector:
        try:
            assert process.stdin and process.stdout and process.stderr  # all three are pipes
            with contextlib.suppress(BrokenPipeError):  # a helper may exit without reading stdin
                process.stdin.write(server.encode())
                process.stdin.close()
            selector.register(process.stdout, selectors.EVENT_READ, stdout)
            selector.register(process.stderr, selectors.EVENT_READ, stderr)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(argv, timeout)
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    key.data.extend(chunk)
                    if len(stdout) + len(stderr) > HELPER_OUTPUT_LIMIT:
                        raise _OutputLimitError
            returncode = process.wait(max(deadline - time.monotonic(), 0))
        finally:
            if process.poll() is None:
                process.kill()
    # Helpers answer in UTF-8 JSON; anything else must not fail with a decoding traceback.
    return subprocess.CompletedProcess(
        argv, returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    )


def _auth_entry(config: dict[str, Any], host: str, path: Path) -> dict[str, Any] | None:
    entry = _lookup(_section(config, "auths", path), host)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise RegistryError(f"docker config {path}: the auths entry for {host} is not a JSON object")
    return entry


def _decode_entry(entry: dict[str, Any], host: str, path: Path) -> Credentials | None:
    # An identity token supersedes a password when both are present, as in docker.
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(username=IDENTITY_TOKEN_USER, password=token)
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"docker config {path}: the auth value for {host} is not base64 of user:password",
                hint=f"log in again with `docker login {host}` or fix the entry",
            ) from exc
        username, colon, password = decoded.partition(":")
        if not colon:
            raise RegistryError(
                f"docker config {path}: the auth value for {host} has no ':' between user and password",
                hint=f"log in again with `docker login {host}` or fix the entry",
            )
        return Credentials(username=username, password=password)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return Credentials(username=user, password=secret)
    return None
