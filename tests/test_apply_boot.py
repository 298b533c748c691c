"""The boot proof run on what ``cocoonplan apply`` installed: the examples applied to an empty
node root whose cocoon is the v0.3.8 emulator (tests/cocoon_emulator.py), layers converted with
the real mkfs.erofs, then ``cocoonplan verify --boot --as-on-node`` cold-boots in QEMU the disks
the node's clone really runs on (its records, the EROFS files apply wrote) and checks its spec's
expectations in the root the guest assembles.

With the emulator's #46 fault (``vm clone`` leaves out the snapshot's top layers) apply's own
proof fails first; the node is booted anyway, and the boot proof names the missing file too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bootproof import require_kernel_root
from clirunner import copy_examples, run_cli
from cocoon_emulator import install_shim

pytestmark = pytest.mark.usefixtures("erofs_as_root")

WATCHDOG = "/usr/local/bin/simular-agent-watchdog.sh"
"""What ``agent-clone.yaml`` expects, from layer 9 of the snapshot's 11-layer base."""


@pytest.fixture(scope="module")
def kernel_root() -> Path:
    return require_kernel_root()


def _applied(tmp_path: Path, fault: str | None = None) -> tuple[Path, str]:
    """A copy of the examples whose node-a is an empty cocoon root run by the emulator (with the
    injected ``fault``), applied: the project directory and apply's stderr."""
    project = copy_examples(tmp_path / "examples")
    root = tmp_path / "node-root"
    root.mkdir()
    env = {
        "COCOON_EMULATOR_HOST_ROOT": str(root),
        "COCOON_EMULATOR_SEED": "apply-boot",
        "COCOON_EMULATOR_CPUS": "16",
    }
    if fault is not None:
        env["COCOON_EMULATOR_FAULT"] = fault
    shim = install_shim(tmp_path / "bin", env)
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace(
            "    state: node\n", f"    state: {root}\n    cocoonVersion: v0.3.8\n    cocoon: {shim}\n"
        )
    )
    applied = run_cli(["apply", ".", "--auto-approve"], project)
    assert applied.exit_code == (0 if fault is None else 1), applied.stdout + applied.stderr
    return project, " ".join(applied.stderr.split())


def test_the_disks_apply_installed_boot_to_the_planned_root(kernel_root: Path, tmp_path: Path) -> None:
    project, _ = _applied(tmp_path)
    result = run_cli(["verify", "--boot", "--as-on-node", "agent-clone.yaml"], project)
    assert result.exit_code == 0, result.stdout + result.stderr
    headline, *checks = result.stdout.splitlines()
    assert headline.startswith("node-a/agent-clone: proven: the node's disks (11 layers), "), headline
    assert checks == [f"  present: {WATCHDOG}"]
    assert "Proven by boot: 1 VM." in result.stderr


def test_a_clone_cocoon_built_without_its_top_layers_fails_the_boot_proof_too(
    kernel_root: Path, tmp_path: Path
) -> None:
    project, applied = _applied(tmp_path, "clone-drop-top-layers:2")
    # Apply's proof catches it first, naming the layers cocoon left out ...
    assert "does not run what the plan says" in applied, applied
    assert "disks.cocoon-layer9 is missing" in applied and "disks.cocoon-layer10 is missing" in applied
    assert f"{WATCHDOG}: missing from the 9 layers it runs on" in applied
    # ... and booting the node's disks shows what that costs: the watchdog is not there.
    result = run_cli(["verify", "--boot", "--as-on-node", "agent-clone.yaml"], project)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stdout.startswith("node-a/agent-clone: FAILED: the node's disks (9 layers), "), (
        result.stdout
    )
    assert f"  missing: {WATCHDOG}" in result.stdout.splitlines()
    assert f"Boot proof failed: node-a/agent-clone: missing: {WATCHDOG}" in result.stderr.splitlines()
