"""``cocoonplan verify --boot``: a VM's disks cold-booted in QEMU, its spec's expectations
checked in the root the guest assembles, success judged by the console's markers alone.

The founding scenario, as the shipped example has it (``agent-clone`` on its node's 6
substituted layers lacks the watchdog its spec expects), and once more built here with
ocifixture so that the node has pulled only the substituted image: 9 of the 11 planned layers
are then fetched from the project's OCI layout and converted as apply converts them. The
planned disks boot to a root that has the watchdog, the node's disks to one that lacks it, and
``verify`` says so by name. A guest that panics or hangs is a failure reported within the
bound, and no process or file is left.

The pure parts (the cpio archive, the console parser, the verdict) are tested without a boot.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bootproof import require_kernel_root
from clirunner import copy_examples, run_cli
from cocoonplan.cocoon import DiskRole
from cocoonplan.errors import ProofError
from cocoonplan.proof.boot import prove_one
from cocoonplan.proof.console import PathKind, parse_console
from cocoonplan.proof.disks import Disk, DiskImage
from cocoonplan.proof.host import Accelerator, KvmMode, Machine, choose_machine, kvm_problem
from cocoonplan.proof.initramfs import Entry, archive, directory, regular, request_archive
from cocoonplan.proof.kernel import Guest, prepare_guest
from cocoonplan.proof.qemu import STOP_GRACE_SECONDS, qemu_command
from cocoonplan.proof.target import BootTarget, DiskSet, TargetDisk
from cocoonplan.proof.verdict import Verdict, judge
from cocoonplan.spec import ExpectedFile
from ocifixture import (
    AS_WRITTEN,
    Clone,
    Nic,
    NodeVM,
    OwnerRecord,
    SourceVM,
    image,
    layer,
    node_root,
    snapshot,
    write_layout,
)

WATCHDOG = "usr/local/bin/simular-agent-watchdog.sh"
WATCHDOG_SCRIPT = (
    b"#!/bin/sh\n# restarts the agent when it stops answering\nexec /opt/agent/bin/agent --watch\n"
)
FULL = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface"
SUBSTITUTED = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
SNAPSHOT = "ghcr.io/cocoonstack/agent-snap:v1"
CLONE_ID = "V4SEH2KVJ72CEUVW75EFR6EDT4"
TCG = Machine(accelerator=Accelerator.TCG)


# --------------------------------------------------------------------------- the founding scenario


def founding_project(path: Path) -> Path:
    """A project whose ``agent-clone`` clones a snapshot of the 11-layer image (the watchdog in
    layer 10) and runs on its node on the 6 layers of another build, as in cocoon issue #46.
    The node has pulled only that other build: 9 planned layers must be converted."""
    base = [
        layer({"etc/os-release": b"ID=ubuntu\nVERSION_ID=24.04\n", "etc/hostname": b"cocoon\n"}),
        layer(
            {"boot/vmlinuz-6.1.0-cocoon": b"FAKE bzImage\n", "boot/initrd.img-6.1.0-cocoon": b"FAKE initrd\n"}
        ),
    ]
    full = image(
        [
            *base,
            *(layer({f"usr/share/xface/{n}.txt": f"xface 24.04 layer {n}\n".encode()}) for n in range(2, 10)),
            layer({WATCHDOG: WATCHDOG_SCRIPT, "usr/share/xface/10.txt": b"xface 24.04 layer 10\n"}),
        ]
    )
    substituted = image(
        [
            *base,
            *(
                layer({f"usr/share/xface/{n}.txt": f"xface 20260513 layer {n}\n".encode()})
                for n in range(2, 6)
            ),
        ],
        created="2026-05-13T09:00:00Z",
    )
    source = SourceVM(
        id="UJZDEGXDNCF32EPF3DHODZDOCI",
        name="agent-src",
        nics=[Nic(ip="10.22.0.5", gateway="10.22.0.1", tap="tapUJZDEGXD-0", mac="6a:1f:3c:88:0d:42")],
    )
    snap = snapshot(full, base_ref=FULL, vm=source)
    write_layout(path / "oci", {FULL: full, SUBSTITUTED: substituted, SNAPSHOT: snap})
    clone = NodeVM(
        id=CLONE_ID,
        name="agent-clone",
        source=Clone(snap),
        layers=[b.digest for b in substituted.layers],
        nics=[Nic(ip="10.22.0.9", gateway="10.22.0.1")],
    )
    owner = OwnerRecord(
        name="agent-clone",
        spec_file="agent-clone.yaml",
        source=snap.digest,
        config_sha256=AS_WRITTEN,
        launch=AS_WRITTEN,
        cmdline=AS_WRITTEN,
    )
    node_root(path / "node", images={SUBSTITUTED: substituted}, vms=[clone], owned={CLONE_ID: owner})
    (path / "cocoonplan.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nregistries:\n  ghcr.io: {layout: oci}\n"
        "nodes:\n  node-a: {rootDir: /var/lib/cocoon, cpus: 16, state: node}\n"
    )
    (path / "agent-clone.yaml").write_text(
        f"""apiVersion: cocoonplan/v1alpha1
kind: VM
metadata:
  name: agent-clone
spec:
  snapshot: {SNAPSHOT}
  node: node-a
  expect:
    baseImage: {FULL}
    files:
      - path: /{WATCHDOG}
        sha256: {hashlib.sha256(WATCHDOG_SCRIPT).hexdigest()}
        mode: "0644"
      - /etc/os-release
    absent: [/etc/shadow]
"""
    )
    return path


@pytest.fixture(scope="module")
def kernel_root() -> Path:
    return require_kernel_root()


@pytest.fixture(scope="module")
def founding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return founding_project(tmp_path_factory.mktemp("founding"))


def test_the_planned_eleven_layers_have_the_watchdog(kernel_root: Path, founding: Path) -> None:
    """The planned disk set (9 of its 11 layers converted from the layout, 2 the node's own
    files) boots to a root with the watchdog, byte for byte and with its mode."""
    result = run_cli(["verify", "--boot", "agent-clone.yaml"], founding)
    assert result.exit_code == 0, result.stdout + result.stderr
    headline, *checks = result.stdout.splitlines()
    assert headline.startswith("node-a/agent-clone: proven: planned disks (11 layers), ")
    assert checks == [f"  present: /{WATCHDOG}", "  present: /etc/os-release", "  absent: /etc/shadow"]
    assert "Proven by boot: 1 VM." in result.stderr


def test_the_substituted_six_layers_lack_the_watchdog_and_say_so(kernel_root: Path, founding: Path) -> None:
    """The disks the node really runs the clone on boot (silently, as they do on the node) to a
    root without the watchdog: ``verify`` exits 1 and names the VM and the missing file."""
    result = run_cli(["verify", "--boot", "--as-on-node", "agent-clone.yaml"], founding)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stdout.startswith("node-a/agent-clone: FAILED: the node's disks (6 layers), ")
    assert f"  missing: /{WATCHDOG}" in result.stdout.splitlines()
    assert "  present: /etc/os-release" in result.stdout.splitlines()
    assert f"Boot proof failed: node-a/agent-clone: missing: /{WATCHDOG}" in result.stderr.splitlines()


def test_the_shipped_example_on_its_node_lacks_the_watchdog(kernel_root: Path, tmp_path: Path) -> None:
    """``verify --boot --as-on-node`` of the shipped ``agent-clone``: the 6 layers its node runs
    it on boot without the watchdog ``agent-clone.yaml`` expects, and the failure names it (the
    planned 11 layers pass in CI: scripts/test)."""
    project = copy_examples(tmp_path / "examples")
    result = run_cli(["verify", "--boot", "--as-on-node", "agent-clone.yaml"], project)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stdout.startswith("node-a/agent-clone: FAILED: the node's disks (6 layers), ")
    assert f"  missing: /{WATCHDOG}" in result.stdout.splitlines()


def test_the_nodes_disks_need_its_root_directory(kernel_root: Path, tmp_path: Path) -> None:
    """``--as-on-node`` boots the node's own layer files: from an exported state document,
    which holds none, the failure says which disk cannot be booted and how to give the root."""
    project = copy_examples(tmp_path / "examples")
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0, exported.stderr
    (project / "node.json").write_text(exported.stdout)
    result = run_cli(
        ["verify", "--boot", "--as-on-node", "--state", "node-a=node.json", "agent-clone.yaml"], project
    )
    assert result.exit_code == 1
    assert "VM node-a/agent-clone: layer disk cocoon-layer0 (sha256:" in result.stderr
    assert "node node-a has no root directory readable here" in result.stderr
    assert "hint: give the node's cocoon root directory (--root node-a=DIR)" in result.stderr


def test_a_boot_over_its_bound_fails_in_time_and_leaves_nothing(
    kernel_root: Path, founding: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A boot that cannot finish within ``--timeout`` is a failure reported when the bound
    passes (plus QEMU's few seconds to exit), with the console's tail; no QEMU is left running
    and the run's temporary directory is gone."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    started = time.monotonic()
    result = run_cli(["verify", "--boot", "--as-on-node", "--timeout", "1", "agent-clone.yaml"], founding)
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "no power-off within 1 s" in result.stdout
    assert "console" in result.stdout
    assert elapsed < 1 + STOP_GRACE_SECONDS + 30  # preparing the guest takes a few seconds
    assert list(scratch.iterdir()) == []
    assert not _processes_mentioning(str(scratch))


# --------------------------------------------------------------------------- guests that fail


@pytest.fixture(scope="module")
def guest(kernel_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Guest, Path]:
    """The proof guest, and the directory boots of it work in (holding only ``guest``)."""
    work = tmp_path_factory.mktemp("failing")
    (work / "guest").mkdir()
    return prepare_guest(kernel_root, work / "guest"), work


def _cow_only(kernel_args: tuple[str, ...]) -> BootTarget:
    return BootTarget(
        node="node-a",
        vm="broken",
        disk_set=DiskSet.PLANNED,
        disks=(TargetDisk(serial="cocoon-cow", role=DiskRole.COW, readonly=False),),
        kernel_args=kernel_args,
        files=(ExpectedFile(path="/etc/os-release"),),
    )


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (a boot's private directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if entry.name.isdigit() and text.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_a_guest_that_panics_is_a_failure_naming_the_panic(guest: tuple[Guest, Path]) -> None:
    """No init to run: the kernel panics, QEMU exits 0 (``panic=-1 -no-reboot``), and the
    verdict is a failure quoting the panic, not a pass, long before the bound."""
    proof_guest, work = guest
    started = time.monotonic()
    result = prove_one(
        _cow_only(("rdinit=/no-such-init",)), proof_guest, {}, choose_machine(KvmMode.AUTO), 120, work
    )
    assert time.monotonic() - started < 120
    assert not result.ok and result.failure is not None
    assert result.failure.startswith("the guest kernel panicked: ")
    assert "Kernel panic" in result.report.tail()
    assert result.checks == ()
    assert [p.name for p in work.iterdir()] == ["guest"]


def test_a_guest_that_hangs_is_a_failure_within_the_bound(guest: tuple[Guest, Path]) -> None:
    """An init that never powers off (busybox ``sleep``): the boot ends at its bound, the
    failure says where it was stuck, and the QEMU and its files are gone."""
    proof_guest, work = guest
    bound = 6.0
    started = time.monotonic()
    result = prove_one(
        _cow_only(("rdinit=/cocoon/busybox", "--", "sleep", "600")),
        proof_guest,
        {},
        choose_machine(KvmMode.AUTO),
        bound,
        work,
    )
    assert time.monotonic() - started < bound + STOP_GRACE_SECONDS + 5
    assert result.failure == f"no power-off within {bound:g} s, stuck before /init started"
    assert result.report.timed_out
    assert [p.name for p in work.iterdir()] == ["guest"]
    assert not _processes_mentioning(str(work))


# --------------------------------------------------------------------------- pure parts


def test_the_newc_archive_is_what_gnu_cpio_reads(tmp_path: Path) -> None:
    """Built in memory, checked by an independent reader: GNU cpio lists and extracts every
    member with its bytes and mode."""
    data = archive(
        [
            directory("tools"),
            regular("tools/run", b"#!/bin/sh\necho run\n", 0o755),
            regular("tools/odd size", b"12345"),
            Entry(name="console", mode=0o020600, device=(5, 1)),
        ]
    )
    listed = subprocess.run(
        ["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True, timeout=30
    )
    assert listed.stdout.decode().split("\n")[:4] == ["tools", "tools/run", "tools/odd size", "console"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "console"],
        input=data,
        cwd=out,
        check=True,
        timeout=30,
    )
    assert (out / "tools" / "run").read_bytes() == b"#!/bin/sh\necho run\n"
    assert (out / "tools" / "run").stat().st_mode & 0o777 == 0o755
    assert (out / "tools" / "odd size").read_bytes() == b"12345"
    assert archive([regular("a", b"x")]) == archive([regular("a", b"x")])


def test_the_request_names_each_path_by_number() -> None:
    target = BootTarget(
        node="node-a",
        vm="vm",
        disk_set=DiskSet.PLANNED,
        disks=(),
        kernel_args=(),
        files=(ExpectedFile(path="/a b/c", sha256="0" * 64), ExpectedFile(path="/d")),
        absent=("/e",),
    )
    listed = subprocess.run(
        ["cpio", "-i", "--to-stdout", "--quiet", "cocoon/expect"],
        input=request_archive(target.probes(), inventory=False),
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert listed.stdout == b"0\t1\t/a b/c\n1\t0\t/d\n2\t0\t/e\n"


EXPECTING = BootTarget(
    node="node-a",
    vm="vm",
    disk_set=DiskSet.PLANNED,
    disks=(),
    kernel_args=(),
    files=(
        ExpectedFile(path="/ok", sha256="a" * 64, mode="0755"),
        ExpectedFile(path="/gone"),
        ExpectedFile(path="/other", sha256="a" * 64),
        ExpectedFile(path="/mode", mode="600"),
        ExpectedFile(path="/dir", sha256="a" * 64),
        ExpectedFile(path="/link"),
        ExpectedFile(path="/with space"),
    ),
    absent=("/nothing", "/something"),
)
ANSWERS = [
    f"COCOON-EXPECT: 0 file 755 {'a' * 64} /ok",
    "COCOON-EXPECT: 1 missing - - /gone",
    f"COCOON-EXPECT: 2 file 644 {'b' * 64} /other",
    "COCOON-EXPECT: 3 file 644 - /mode",
    "COCOON-EXPECT: 4 dir 755 - /dir",
    "COCOON-EXPECT: 5 dangling - - /link",
    "COCOON-EXPECT: 6 other 600 - /with space",
    "COCOON-EXPECT: 7 missing - - /nothing",
    "COCOON-EXPECT: 8 dir 755 - /something",
]


def _console(*lines: str) -> str:
    return "\r\n".join(["[    0.1] boot noise", "COCOON-MARKER: init", *lines]) + "\r\n"


def test_each_expectation_gets_its_verdict() -> None:
    report = parse_console(_console(*ANSWERS, "COCOON-MARKER: done"), seconds=2.0)
    assert report.observations[6].kind is PathKind.OTHER and report.observations[6].path == "/with space"
    result = judge(EXPECTING, report, TCG, 120)
    assert result.failure is None and not result.ok
    assert [(c.path, c.verdict, c.expected, c.found) for c in result.checks] == [
        ("/ok", Verdict.PRESENT, None, None),
        ("/gone", Verdict.MISSING, None, None),
        ("/other", Verdict.CONTENT, "a" * 64, "b" * 64),
        ("/mode", Verdict.MODE, "0600", "0644"),
        ("/dir", Verdict.NOT_A_FILE, None, "dir"),
        ("/link", Verdict.DANGLING, None, None),
        ("/with space", Verdict.PRESENT, None, None),
        ("/nothing", Verdict.ABSENT, None, None),
        ("/something", Verdict.UNWANTED, None, "dir"),
    ]
    assert [c.describe() for c in result.findings][:3] == [
        "missing: /gone",
        f"content differs: /other (sha256 {'b' * 64}, expected {'a' * 64})",
        "mode differs: /mode (mode 0644, expected 0600)",
    ]


@pytest.mark.parametrize(
    ("console", "timed_out", "failure"),
    [
        (_console(*ANSWERS), True, "no power-off within 120 s, stuck in /init"),
        ("early kernel noise\n", True, "no power-off within 120 s, stuck before /init started"),
        (
            _console("[    1.2] Kernel panic - not syncing: Attempted to kill init!"),
            False,
            "the guest kernel panicked: [    1.2] Kernel panic - not syncing: Attempted to kill init!",
        ),
        (
            _console("COCOON-ERROR: mount layer cocoon-layer3"),
            False,
            "the guest failed: mount layer cocoon-layer3",
        ),
        (
            _console(*ANSWERS[:8], "COCOON-MARKER: done"),
            False,
            "the guest answered for 8 of 9 expected paths",
        ),
        (
            _console(*ANSWERS[:8], "COCOON-EXPECT: 8 dir 755 - /somewhere", "COCOON-MARKER: done"),
            False,
            "the guest answered for 9 of 9 expected paths, garbled for number(s) 8",
        ),
        (
            _console(*ANSWERS, "COCOON-EXPECT: 9 file", "COCOON-MARKER: done"),
            False,
            "the guest failed: garbled console line: 'COCOON-EXPECT: 9 file'",
        ),
        (_console(*ANSWERS), False, "the guest stopped before it finished"),
    ],
)
def test_a_boot_that_proves_nothing_is_a_failure(console: str, timed_out: bool, failure: str) -> None:
    result = judge(EXPECTING, parse_console(console, seconds=1.0, timed_out=timed_out), TCG, 120)
    assert result.failure == failure
    assert not result.ok and result.checks == ()


def test_kvm_is_used_exactly_where_it_can_boot_a_stock_kernel() -> None:
    """``auto`` takes KVM only where it can boot the guest (not on PVM hosts), ``on`` refuses
    where it cannot and says why, ``off`` is always TCG."""
    problem = kvm_problem()
    assert choose_machine(KvmMode.OFF).accelerator is Accelerator.TCG
    auto = choose_machine(KvmMode.AUTO)
    assert auto.accelerator is (Accelerator.TCG if problem else Accelerator.KVM)
    assert auto.note == (f"KVM: {problem}" if problem else "")
    if problem is None:
        assert choose_machine(KvmMode.ON).accelerator is Accelerator.KVM
    else:
        with pytest.raises(ProofError, match="--kvm on: KVM cannot boot the guest here"):
            choose_machine(KvmMode.ON)


def test_the_qemu_command_attaches_disks_in_order_and_escapes_their_values() -> None:
    """Disks keep their order and serials; a comma in a serial or path (a node record is
    hostile input) stays inside its value; read-only disks take no lock; TCG skips the TSC
    calibration, KVM runs the host's CPU."""
    disks = [
        Disk(serial="cocoon-layer0", readonly=True, image=DiskImage(path="/dev/fd/7", fd=7)),
        Disk(serial="x,drive=disk0", readonly=False, image=DiskImage(path="/tmp/a,b/cow.ext4")),
    ]
    tcg = qemu_command(
        Path("/k"), Path("/i"), disks, ["cocoon.cow=x"], TCG.model_copy(update={"tsc_khz": 1000})
    )
    assert tcg[tcg.index("-accel") + 1] == "tcg"
    assert (
        tcg[tcg.index("-append") + 1] == "console=ttyS0 panic=-1 loglevel=3 tsc_early_khz=1000 cocoon.cow=x"
    )
    drives = [tcg[i + 1] for i, arg in enumerate(tcg) if arg in ("-drive", "-device")]
    assert drives == [
        "id=disk0,if=none,format=raw,file=/dev/fd/7,readonly=on,file.locking=off",
        "virtio-blk-device,drive=disk0,serial=cocoon-layer0",
        "id=disk1,if=none,format=raw,file=/tmp/a,,b/cow.ext4",
        "virtio-blk-device,drive=disk1,serial=x,,drive=disk0",
    ]
    kvm = qemu_command(Path("/k"), Path("/i"), disks, [], Machine(accelerator=Accelerator.KVM))
    assert kvm[1:5] == ["-accel", "kvm", "-cpu", "host"]
    assert "tsc_early_khz" not in kvm[kvm.index("-append") + 1]


def test_verify_without_boot_says_what_it_needs(tmp_path: Path) -> None:
    result = run_cli(["verify", "."], tmp_path)
    assert result.exit_code == 1
    assert "give --boot" in result.stderr


def test_missing_kernel_root_is_an_error_with_the_way_to_get_one(tmp_path: Path) -> None:
    result = run_cli(["verify", "--boot", "--kernel-root", str(tmp_path)], tmp_path)
    assert result.exit_code == 1
    assert f"a kernel under {tmp_path}, which has no lib/modules" in result.stderr
    assert "scripts/fetch-kernel" in result.stderr
