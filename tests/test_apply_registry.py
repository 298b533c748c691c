"""``cocoonplan apply`` with its content from the real loopback docker-registry: the examples'
OCI layout pushed there with skopeo (digests preserved), read through a proxy that records
every request (bench/proxy.py), and applied to empty node roots whose cocoon is the v0.3.8 emulator.

A first plan and apply fetch each blob once, and keep what they fetched (plan in cocoonplan's
cache; apply hard-links its downloads there, the cache being on the node root's file system).
Applying the same content again fetches none: not after ``cocoon vm rm`` of the clone (its
layers and its imported snapshot are on the node), and not on a second empty node sharing
cocoonplan's cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from clirunner import EXAMPLES, REPO, copy_examples, run_cli
from cocoon_emulator import install_shim
from needs import missing_tool
from ocifixture import push_with_skopeo
from registry_server import RegistryServer

sys.path.insert(0, str(REPO / "bench"))  # the benchmark's counting proxy, one copy for both
from proxy import CountingProxy

pytestmark = pytest.mark.usefixtures("erofs_as_root")

ROOT_DIR = "/var/lib/cocoon"


def blob_gets(proxy: CountingProxy) -> Counter[str]:
    """How often each blob digest was asked for with GET since the proxy's last reset."""
    return Counter(
        path.rsplit("/", 1)[-1] for method, path in proxy.log if method == "GET" and "/blobs/" in path
    )


@pytest.fixture
def proxy(fresh_registry: RegistryServer) -> Iterator[CountingProxy]:
    """The examples' content in a registry of this test's own, behind a recording proxy."""
    if shutil.which("skopeo") is None:
        missing_tool("skopeo", "skopeo")
    index = json.loads((EXAMPLES / "oci/index.json").read_text())
    for manifest in index["manifests"]:
        ref = manifest["annotations"]["org.opencontainers.image.ref.name"]
        push_with_skopeo(EXAMPLES / "oci", ref, f"{fresh_registry.host}/{ref.removeprefix('ghcr.io/')}")
    counting = CountingProxy(fresh_registry.host)
    yield counting
    counting.close()


def _use_node(tmp_path: Path, project: Path, root: Path) -> None:
    """Point node-a at the empty cocoon root ``root``, run by the emulator."""
    root.mkdir()
    shim = install_shim(
        tmp_path / "bin",
        {
            "COCOON_EMULATOR_HOST_ROOT": str(root),
            "COCOON_EMULATOR_SEED": root.name,
            "COCOON_EMULATOR_CPUS": "16",
        },
    )
    config = project / "cocoonplan.yaml"
    lines = [line for line in config.read_text().splitlines() if not line.startswith("    cocoon")]
    config.write_text(
        "\n".join(
            f"    state: {root}\n    cocoonVersion: v0.3.8\n    cocoon: {shim}"
            if line.startswith("    state: ")
            else line
            for line in lines
        )
        + "\n"
    )


def _plan_and_apply(project: Path, name: str) -> set[str]:
    """``plan --out NAME`` then ``apply NAME``; the digests of the blobs the plan names."""
    planned = run_cli(["plan", ".", "--out", name], project)
    assert planned.exit_code == 0, planned.stdout + planned.stderr
    applied = run_cli(["apply", name], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    document = json.loads((project / name).read_text())
    return {blob["digest"] for vm in document["vms"] for blob in vm["blobs"]}


def test_a_first_apply_fetches_each_blob_once_and_a_second_fetches_none(
    proxy: CountingProxy, tmp_path: Path
) -> None:
    project = copy_examples(tmp_path / "examples")
    shutil.rmtree(project / "oci")  # every byte from the registry
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("    layout: oci\n", f"    mirror: http://{proxy.host}\n"))
    _use_node(tmp_path, project, tmp_path / "node-1")

    needed = _plan_and_apply(project, "first.json")
    fetched = blob_gets(proxy)
    assert len(needed) == 22 and needed <= fetched.keys(), sorted(needed - fetched.keys())
    assert [d for d, count in fetched.items() if count > 1] == [], "each blob fetched once by plan and apply"

    # The clone removed through cocoon: planning and applying it again fetches nothing.
    proxy.reset()
    vms = json.loads((tmp_path / "node-1/cloudhypervisor/db/vms.json").read_text())
    clone = vms["names"]["agent-clone"]
    shim = [str(tmp_path / "bin/cocoon"), "--root-dir", ROOT_DIR]
    removed = subprocess.run([*shim, "vm", "rm", "--force", clone], capture_output=True, check=False)
    assert removed.returncode == 0, removed.stderr.decode()
    _plan_and_apply(project, "again.json")
    assert json.loads((project / "again.json").read_text())["summary"]["create"] == 1
    assert blob_gets(proxy) == Counter(), "nothing fetched for content the node or the cache has"

    # A second empty node, cocoonplan's cache shared: served from the verified cache.
    proxy.reset()
    _use_node(tmp_path, project, tmp_path / "node-2")
    assert _plan_and_apply(project, "second-node.json") == needed
    assert blob_gets(proxy) == Counter(), "nothing fetched for content cocoonplan's cache has"
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0
