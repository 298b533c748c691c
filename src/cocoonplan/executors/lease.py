"""One apply per node: a lease file under the node root, taken exclusively.

``<root>/cocoonplan/apply.lock`` holds who took it (ID, owner, host, PID), for what and until
when. A second apply fails at once naming the holder, or waits up to a timeout; a lease past
its expiry may be taken over (its holder died without releasing it); ``force-unlock`` removes
a lease by its ID only, so nobody removes a lease they have not looked at.

A live holder renews its lease every third of its term (a heartbeat thread), so an apply that
runs longer than the term is never taken over; a holder whose lease was taken over anyway (it
was stopped past the term, or someone forced the lock) renews nothing of the new holder's and
fails at its next check (:func:`ensure_held`), or at the latest when it ends.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from cocoonplan.atomic import create_exclusive, read_bounded, remove_file, write_atomic
from cocoonplan.bounded import InputLimitError, loads
from cocoonplan.errors import CocoonplanError
from cocoonplan.model import Model

LEASE_FILE = "cocoonplan/apply.lock"
LEASE_LIMIT = 64 * 1024
DEFAULT_TERM = timedelta(hours=1)


class LeaseHeldError(CocoonplanError):
    """Another apply holds the node."""


class LeaseLostError(CocoonplanError):
    """The node's lease is no longer this apply's: another took it over."""


class Lease(Model):
    """Who holds a node for apply, and until when."""

    id: str
    owner: str
    host: str
    pid: int
    operation: str
    created: datetime
    expires: datetime

    def describe(self) -> str:
        """The holder, for messages."""
        return (
            f"lease {self.id} by {self.owner}@{self.host} (pid {self.pid}, {self.operation}) "
            f"since {self.created.isoformat()}, expires {self.expires.isoformat()}"
        )


def read_lease(root: Path) -> Lease | None:
    """The lease on the node root ``root``, None when there is none."""
    data = read_bounded(root, LEASE_FILE, LEASE_LIMIT)
    if data is None:
        return None
    try:
        if len(data) > LEASE_LIMIT:
            raise InputLimitError(f"larger than {LEASE_LIMIT} bytes")
        # Bounded: a lease nested thousands deep is a refusal here, not a RecursionError.
        return Lease.model_validate(loads(data))
    except (InputLimitError, ValidationError) as exc:
        why = f": {exc}" if isinstance(exc, InputLimitError) else ""
        raise CocoonplanError(
            f"{root / LEASE_FILE}: not a cocoonplan lease{why}",
            hint=f"inspect it; `cocoonplan force-unlock NODE ID` needs its id, or remove {LEASE_FILE} by hand",
        ) from exc


def _take(root: Path, lease: Lease) -> bool:
    return create_exclusive(root, LEASE_FILE, lease.model_dump_json())


def _lost(node: str, lease: Lease, held: Lease | None) -> LeaseLostError:
    now = f"it is now {held.describe()}" if held is not None else "it was removed (force-unlock)"
    return LeaseLostError(
        f"node {node} is no longer held by this apply's lease {lease.id}: {now}",
        hint="another apply may be changing the node: stop here, wait for it, then plan again and review",
    )


def ensure_held(root: Path, node: str, lease: Lease) -> None:
    """Raise LeaseLostError, naming the new holder, unless the node's lease is still ``lease``."""
    held = read_lease(root)
    if held is None or held.id != lease.id:
        raise _lost(node, lease, held)


class _Heartbeat(threading.Thread):
    """Renews a held lease every third of its term until stopped or until the lease is not ours.

    Waits on an event (not the injected sleep), so that stopping it is immediate; the new
    expiry is read from the injected clock like every other time here. Reading the lease and
    rewriting it are two steps: a takeover landing between them would be overwritten, which
    needs a lease expired while its holder still renews, i.e. one forced by hand."""

    def __init__(self, root: Path, lease: Lease, clock: Callable[[], datetime], term: timedelta) -> None:
        super().__init__(name=f"cocoonplan-lease-{lease.id}", daemon=True)
        self.root, self.lease, self.clock, self.term = root, lease, clock, term
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.term.total_seconds() / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Push the lease's expiry a term ahead; False (and nothing written) when it is not ours."""
        try:
            held = read_lease(self.root)
            if held is None or held.id != self.lease.id:
                return False
            renewed = self.lease.model_copy(update={"expires": self.clock() + self.term})
            write_atomic(self.root, LEASE_FILE, renewed.model_dump_json())
        except CocoonplanError:
            return False  # the apply's own check names what is wrong with the lease
        return True

    def stop(self) -> None:
        self.stopping.set()
        self.join()


@contextlib.contextmanager
def hold(
    root: Path,
    *,
    node: str,
    owner: str,
    host: str,
    pid: int,
    operation: str,
    clock: Callable[[], datetime],
    sleep: Callable[[float], None],
    wait: timedelta = timedelta(0),
    term: timedelta = DEFAULT_TERM,
) -> Iterator[Lease]:
    """Hold the node for the ``with`` body, released afterwards whatever happens.

    Waits up to ``wait`` for a held lease, polling; takes over an expired one. While held, the
    lease is renewed every ``term``/3 (see the module docstring). When the body ends and the
    lease is no longer ours, LeaseLostError names the new holder, whose lease is left alone.
    The clock and sleep are passed in: nothing here reads the time on its own.
    """
    start = clock()
    while True:
        now = clock()
        lease = Lease(
            id=secrets.token_hex(8),
            owner=owner,
            host=host,
            pid=pid,
            operation=operation,
            created=now,
            expires=now + term,
        )
        if _take(root, lease):
            break
        held = read_lease(root)
        if held is not None and held.expires <= now:
            # Its holder is gone: only the lease we read is removed, never a newer one.
            with contextlib.suppress(CocoonplanError):
                release(root, held.id)
            continue
        if held is not None and now - start >= wait:
            raise LeaseHeldError(
                f"node {node} is held by another apply: {held.describe()}",
                hint=f"wait for it (--lock-timeout), or after checking it is gone: cocoonplan force-unlock {node} {held.id}",
            )
        sleep(1.0)
    heartbeat = _Heartbeat(root, lease, clock, term)
    heartbeat.start()
    try:
        yield lease
    except BaseException:
        heartbeat.stop()
        # The body's own error is the one to report; a lease taken over is left to its holder.
        with contextlib.suppress(CocoonplanError):
            release(root, lease.id)
        raise
    heartbeat.stop()
    ensure_held(root, node, lease)
    release(root, lease.id)


def force_unlock(root: Path, node: str, lease_id: str) -> Lease:
    """Remove node ``node``'s lease ``lease_id`` by hand and return it; no lease, or one of
    another ID, is an error (as ``terraform force-unlock`` fails when there is no lock)."""
    held = read_lease(root)
    if held is None:
        raise CocoonplanError(
            f"node {node} holds no apply lease ({root / LEASE_FILE} is absent): nothing was removed",
            hint="the apply that held it has released it, or someone removed it: there is nothing to unlock",
        )
    if held.id != lease_id:
        raise CocoonplanError(
            f"node {node} is held by {held.describe()}, not by lease {lease_id}: nothing was removed",
            hint=f"check its holder is gone, then: cocoonplan force-unlock {node} {held.id}",
        )
    remove_file(root, LEASE_FILE)
    return held


def release(root: Path, lease_id: str) -> None:
    """Remove the lease ``lease_id``; a lease of another ID is left alone (an error)."""
    held = read_lease(root)
    if held is None:
        return
    if held.id != lease_id:
        raise CocoonplanError(
            f"the node's lease is {held.id}, not {lease_id}: {held.describe()}",
            hint="name the lease id that `cocoonplan apply` printed or the error shows",
        )
    remove_file(root, LEASE_FILE)
