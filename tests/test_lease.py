"""The per-node apply lease: exclusive, naming its holder, expiring, released by ID only."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan.errors import CocoonplanError
from cocoonplan.executors.lease import (
    LEASE_FILE,
    LeaseHeldError,
    LeaseLostError,
    ensure_held,
    hold,
    read_lease,
    release,
)

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
    assert wrong.exit_code == 1 and f"node node-a is held by lease {lease.id} by ci@runner-1" in wrong.stderr
    done = run_cli(["force-unlock", "node-a", lease.id], project)
    assert done.exit_code == 0 and read_lease(project / "node") is None
    assert run_cli(["force-unlock", "node-z", lease.id], project).exit_code == 1


def _wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_a_held_lease_is_renewed_past_its_term(tmp_path: Path) -> None:
    clock = Clock()
    term = timedelta(seconds=0.3)
    with _hold(tmp_path, clock, term=term) as lease:
        assert lease.expires == START + term
        for _ in range(3):  # each renewal pushes the expiry a term past the clock's time then
            clock.now += timedelta(minutes=1)
            _wait_until(
                lambda: (held := read_lease(tmp_path)) is not None and held.expires == clock.now + term
            )
        held = read_lease(tmp_path)
        assert held is not None and held.id == lease.id and held.created == START
        with pytest.raises(LeaseHeldError), _hold(tmp_path, clock, owner="alice"):
            pass  # three terms after it was taken, the lease has not expired: no takeover
    assert read_lease(tmp_path) is None
    clock.now += timedelta(minutes=1)
    time.sleep(0.3)
    assert read_lease(tmp_path) is None, "the heartbeat stopped with the hold: nothing rewritten"


def test_a_lease_taken_over_is_never_renewed_and_fails_the_holder(tmp_path: Path) -> None:
    clock = Clock()
    term = timedelta(seconds=0.3)
    with pytest.raises(LeaseLostError) as lost, _hold(tmp_path, clock, term=term) as lease:
        clock.now += timedelta(minutes=1)
        _wait_until(lambda: (held := read_lease(tmp_path)) is not None and held.expires == clock.now + term)
        # Just renewed (the next renewal is a term/3 away): what an apply that found this lease
        # expired (its holder stopped past the term) does.
        newer = lease.model_copy(update={"id": "feedfacefeedface", "owner": "mallory", "pid": 99})
        (tmp_path / LEASE_FILE).write_text(newer.model_dump_json())
        with pytest.raises(LeaseLostError, match="it is now lease feedfacefeedface by mallory@runner-1"):
            ensure_held(tmp_path, "node-a", lease)
        clock.now += timedelta(minutes=1)
        time.sleep(0.5)  # more than a renewal's interval
        assert read_lease(tmp_path) == newer, "the new holder's lease is not renewed by the old holder"
    message = lost.value.render()
    assert f"node node-a is no longer held by this apply's lease {lease.id}" in message
    assert "feedfacefeedface by mallory@runner-1 (pid 99, apply)" in message
    assert read_lease(tmp_path) == newer, "the new holder's lease is left alone at exit"


NOT_A_LEASE = "not a cocoonplan lease"
LEASE_HINT = "hint: inspect it; `cocoonplan force-unlock NODE ID` needs its id, or remove cocoonplan/apply.lock by hand"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(b"[" * 5000 + b"]" * 5000, ": nested more than 64 levels deep", id="depth-bomb"),
        pytest.param(
            b'{"a":' * 100 + b"1" + b"}" * 100, ": nested more than 64 levels deep", id="deep-object"
        ),
        pytest.param(
            b'{"pid": ' + b"9" * 5000 + b"}",
            ": not valid JSON: an integer of more than 4300 digits",
            id="huge-int",
        ),
        pytest.param(b"\xff\xfe", ": not UTF-8 text", id="not-utf-8"),
        pytest.param(b'{"id": ', ": not valid JSON", id="truncated"),
        pytest.param(b" " * (64 * 1024) + b"{}", ": larger than 65536 bytes", id="oversized"),
        pytest.param(b'{"id": "x"}', "", id="not-a-lease"),
    ],
)
def test_a_hostile_lease_file_is_refused_by_every_reader(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    project = copy_examples(tmp_path / "examples")
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    lease = project / "node" / LEASE_FILE
    lease.parent.mkdir(exist_ok=True)
    lease.write_bytes(content)
    for args in (["force-unlock", "node-a", "0123456789abcdef"], ["apply", "p.json", "--content-only"]):
        result = run_cli(args, project)
        assert result.exit_code == 1, args
        first, hint = result.stderr.splitlines()
        assert first.startswith(f"Error: {lease}: {NOT_A_LEASE}{problem}"), first
        assert hint == LEASE_HINT
        assert lease.read_bytes() == content, "left for the user to inspect"


def test_force_unlock_without_a_lease_fails(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples")
    assert not (project / "node" / LEASE_FILE).exists()
    result = run_cli(["force-unlock", "node-a", "0123456789abcdef"], project)
    # As `terraform force-unlock` fails when there is no lock: nothing was unlocked.
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: node node-a holds no apply lease ({project / 'node' / LEASE_FILE} is absent): nothing was removed\n"
        "hint: the apply that held it has released it, or someone removed it: there is nothing to unlock\n"
    )
    assert "removed." not in result.stderr
