"""load_credentials reads the docker config named by the env mapping, and runs credential helpers."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cocoonplan.errors import RegistryError
from cocoonplan.oci.credentials import Credentials, load_credentials
from registry_server import basic_auth_entry, write_docker_config


def test_auth_entry_is_base64_user_password(tmp_path: Path) -> None:
    env = write_docker_config(tmp_path, {"auths": {"ghcr.io": basic_auth_entry("me", "pa:ss")}})
    assert load_credentials("ghcr.io", env) == Credentials(username="me", password="pa:ss")
    assert load_credentials("quay.io", env) is None


def test_username_password_and_identity_token(tmp_path: Path) -> None:
    env = write_docker_config(
        tmp_path,
        {"auths": {"a.example": {"username": "u", "password": "p"}, "b.example": {"identitytoken": "tok"}}},
    )
    assert load_credentials("a.example", env) == Credentials(username="u", password="p")
    assert load_credentials("b.example", env) == Credentials(username="<token>", password="tok")


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://ghcr.io", "ghcr.io"),
        ("http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("https://registry.example/v1/", "registry.example"),
        ("https://index.docker.io/v1/", "docker.io"),
    ],
)
def test_url_shaped_keys_match(tmp_path: Path, key: str, host: str) -> None:
    env = write_docker_config(tmp_path, {"auths": {key: basic_auth_entry("u", "p")}})
    assert load_credentials(host, env) == Credentials(username="u", password="p")


def test_config_location_from_env_mapping_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_docker_config(home / ".docker", {"auths": {"ghcr.io": basic_auth_entry("home", "p")}})
    other = write_docker_config(tmp_path / "other", {"auths": {"ghcr.io": basic_auth_entry("dc", "p")}})
    assert load_credentials("ghcr.io", {"HOME": str(home)}) == Credentials(username="home", password="p")
    # DOCKER_CONFIG wins over HOME.
    assert load_credentials("ghcr.io", {"HOME": str(home), **other}) == Credentials(
        username="dc", password="p"
    )
    assert load_credentials("ghcr.io", {}) is None
    assert load_credentials("ghcr.io", {"DOCKER_CONFIG": str(tmp_path / "missing")}) is None


def test_password_is_never_shown() -> None:
    credentials = Credentials(username="u", password="hunter2")
    assert "hunter2" not in repr(credentials)
    assert "hunter2" not in str(credentials)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", json.dumps({"auths": []}), json.dumps({"auths": {"ghcr.io": {"auth": "!!"}}})],
)
def test_malformed_config_names_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(RegistryError, match=r"docker config .*config\.json") as raised:
        load_credentials("ghcr.io", {"DOCKER_CONFIG": str(tmp_path)})
    assert str(tmp_path / "config.json") in raised.value.summary


def _helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_credential_helper_gets_the_host_on_stdin(tmp_path: Path) -> None:
    # The helper answers with the server it was asked about, so the test sees what it was sent.
    _helper(
        tmp_path / "bin", "fake", 'read server; printf \'{"Username":"for %s","Secret":"s"}\' "$server"\n'
    )
    env = write_docker_config(tmp_path / "cfg", {"credHelpers": {"ghcr.io": "fake"}, "credsStore": "fake"})
    env["PATH"] = str(tmp_path / "bin")
    assert load_credentials("ghcr.io", env) == Credentials(username="for ghcr.io", password="s")
    assert load_credentials("quay.io", env) == Credentials(username="for quay.io", password="s")
    # Docker Hub's credentials are kept under its legacy index URL.
    assert load_credentials("docker.io", env) == Credentials(
        username="for https://index.docker.io/v1/", password="s"
    )


def test_helper_without_credentials_falls_back_to_auths(tmp_path: Path) -> None:
    _helper(tmp_path / "bin", "empty", "echo 'credentials not found in native keychain'; exit 1\n")
    env = write_docker_config(
        tmp_path / "cfg", {"credsStore": "empty", "auths": {"ghcr.io": basic_auth_entry("inline", "p")}}
    )
    env["PATH"] = str(tmp_path / "bin")
    assert load_credentials("ghcr.io", env) == Credentials(username="inline", password="p")
    assert load_credentials("quay.io", env) is None


def test_missing_or_failing_helper_names_helper_and_host(tmp_path: Path) -> None:
    _helper(tmp_path / "bin", "broken", "echo 'keychain locked' >&2; exit 3\n")
    env = write_docker_config(tmp_path / "cfg", {"credHelpers": {"ghcr.io": "broken", "quay.io": "absent"}})
    env["PATH"] = str(tmp_path / "bin")
    with pytest.raises(
        RegistryError, match=r"docker-credential-broken failed for ghcr.io \(exit 3\)"
    ) as raised:
        load_credentials("ghcr.io", env)
    assert raised.value.detail == "keychain locked"
    with pytest.raises(RegistryError, match=r"docker-credential-absent for quay\.io is not on PATH"):
        load_credentials("quay.io", env)
