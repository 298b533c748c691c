"""The per-node apply lease: exclusive, naming its holder, expiring, released by ID only."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan.errors import CocoonplanError
from cocoonplan.executors.lease import LEASE_FILE, LeaseHeldError, hold, read_lease, release

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _hold(root: Path, clock: Clock, owner: str = "ci", **kwargs: object):  # type: ignore[no-untyped-def]
    return hold(
        root, node="node-a", owner=owner, host="runner-1", pid=42, operation="apply",
        clock=clock, sleep=clock.sleep, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_second_apply_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    clock = Clock()
    with _hold(tmp_path, clock) as lease:
        assert read_lease(tmp_path) == lease
        with pytest.raises(LeaseHeldError) as refused, _hold(tmp_path, clock, owner="alice"):
            pass
        message = refused.value.render()
        assert f"lease {lease.id} by ci@runner-1 (pid 42, apply)" in message
        assert f"cocoonplan force-unlock node-a {lease.id}" in message
        assert clock.now == START, "no waiting without a timeout"
    assert read_lease(tmp_path) is None, "released when the body ends"


def test_a_waiting_apply_gets_the_node_when_it_is_released(tmp_path: Path) -> None:
    clock = Clock()
    holder = _hold(tmp_path, clock)
    first = holder.__enter__()
    released = threading.Event()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now - START >= timedelta(seconds=3) and not released.is_set():
            holder.__exit__(None, None, None)
            released.set()

    with hold(
        tmp_path, node="node-a", owner="bob", host="h", pid=7, operation="apply",
        clock=clock, sleep=sleep, wait=timedelta(seconds=30),
    ) as second:  # fmt: skip
        assert second.id != first.id and second.owner == "bob"
    with (
        pytest.raises(LeaseHeldError),
        _hold(tmp_path, clock, wait=timedelta(seconds=5)),
        _hold(tmp_path, clock, wait=timedelta(seconds=5)),
    ):
        pass


def test_an_expired_lease_is_taken_over(tmp_path: Path) -> None:
    clock = Clock()
    stale = _hold(tmp_path, clock, term=timedelta(minutes=5))
    dead = stale.__enter__()  # its holder dies without releasing
    clock.sleep(600)
    with _hold(tmp_path, clock) as lease:
        assert lease.id != dead.id


def test_release_needs_the_lease_id(tmp_path: Path) -> None:
    clock = Clock()
    holder = _hold(tmp_path, clock)  # kept: a dropped holder releases its lease
    held = holder.__enter__()
    with pytest.raises(CocoonplanError, match=f"the node's lease is {held.id}"):
        release(tmp_path, "0123456789abcdef")
    release(tmp_path, held.id)
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_planted_link_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("precious")
    root = tmp_path / "root"
    (root / "cocoonplan").mkdir(parents=True)
    (root / LEASE_FILE).symlink_to(outside)
    with pytest.raises(CocoonplanError), _hold(root, Clock()):
        pass
    assert outside.read_text() == "precious"


def test_force_unlock_removes_a_lease_by_its_id_only(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples")
    holder = _hold(project / "node", Clock())
    lease = holder.__enter__()
    wrong = run_cli(["force-unlock", "node-a", "0000000000000000"], project)
    assert wrong.exit_code == 1 and f"the node's lease is {lease.id}" in wrong.stderr
    done = run_cli(["force-unlock", "node-a", lease.id], project)
    assert done.exit_code == 0 and read_lease(project / "node") is None
    assert run_cli(["force-unlock", "node-z", lease.id], project).exit_code == 1
