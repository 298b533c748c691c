"""One apply per node: a lease file under the node root, taken exclusively.

``<root>/cocoonplan/apply.lock`` holds who took it (ID, owner, host, PID), for what and until
when. A second apply fails at once naming the holder, or waits up to a timeout; a lease past
its expiry may be taken over (its holder died without releasing it); ``force-unlock`` removes
a lease by its ID only, so nobody removes a lease they have not looked at.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from cocoonplan.atomic import create_exclusive, read_bounded, remove_file
from cocoonplan.errors import CocoonplanError
from cocoonplan.model import Model

LEASE_FILE = "cocoonplan/apply.lock"
LEASE_LIMIT = 64 * 1024
DEFAULT_TERM = timedelta(hours=1)


class LeaseHeldError(CocoonplanError):
    """Another apply holds the node."""


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
        return Lease.model_validate(json.loads(data[:LEASE_LIMIT]))
    except (ValueError, ValidationError) as exc:
        raise CocoonplanError(
            f"{root / LEASE_FILE}: not a cocoonplan lease",
            hint=f"inspect it; `cocoonplan force-unlock NODE ID` needs its id, or remove {LEASE_FILE} by hand",
        ) from exc


def _take(root: Path, lease: Lease) -> bool:
    return create_exclusive(root, LEASE_FILE, lease.model_dump_json())


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

    Waits up to ``wait`` for a held lease, polling; takes over an expired one. The clock and
    sleep are passed in: nothing here reads the time on its own.
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
    try:
        yield lease
    finally:
        release(root, lease.id)


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
