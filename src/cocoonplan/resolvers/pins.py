"""Tags to digests, through the lock file: each tag is resolved once and pinned.

A reference written with a digest needs no lookup. A tag takes its digest from the lock;
the tag is still looked up so that a tag that moved since it was locked shows as a lock
change (old → new) instead of being taken silently. ``locked`` mode (for CI) refuses a
missing entry or a moved tag; ``update`` mode takes the current digest of every tag.

A multi-platform tag is pinned to its index's own digest, as it resolves; each node's
platform manifest follows from those index bytes (:meth:`Pinner.pin_platform`), so one lock
entry serves nodes of every architecture.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from cocoonplan.errors import CocoonplanError, LockError
from cocoonplan.lock import LockFile
from cocoonplan.oci.reference import parse_reference
from cocoonplan.planner.model import LockChange
from cocoonplan.project import Arch
from cocoonplan.resolved import PinnedRef
from cocoonplan.resolvers.content import Content


@dataclass
class Pinner:
    """Pins references for one run; remembers each answer so every tag is resolved once."""

    content: Content
    lock: LockFile
    lock_display: str
    locked: bool = False
    update: bool = False
    changes: dict[str, LockChange] = field(default_factory=dict)
    _pins: dict[str, PinnedRef] = field(default_factory=dict)
    _lookups: dict[str, Future[str]] = field(default_factory=dict)

    def look_up(self, originals: Iterable[str], pool: Executor) -> None:
        """Start asking the source for the digest of every tag among ``originals`` (each once),
        in ``pool``, so that a run's tag lookups overlap; :meth:`pin` takes the answers, in the
        order it is asked, so lock changes keep the order of the specs."""
        for original in originals:
            if original in self._lookups:
                continue
            try:
                ref = parse_reference(original)
            except CocoonplanError:
                continue  # pin raises it, for the VM that names it
            if ref.digest is None:
                self._lookups[original] = pool.submit(self.content.digest, ref)

    def pin(self, original: str) -> PinnedRef:
        """The digest ``original`` stands for in this plan."""
        if original in self._pins:
            return self._pins[original]
        ref = parse_reference(original)
        if ref.digest is not None:
            pinned = PinnedRef(ref=original, digest=ref.digest)
        else:
            pinned = self._pin_tag(original)
        self._pins[original] = pinned
        return pinned

    def pin_platform(self, original: str, arch: Arch) -> PinnedRef:
        """The platform manifest ``original`` stands for on a node of ``arch``: the pinned
        manifest, or the ``linux/<arch>`` child of the pinned index."""
        pinned = self.pin(original)
        ref = parse_reference(original).with_digest(pinned.digest)
        return pinned.model_copy(update={"digest": self.content.manifest(ref, arch).digest})

    def _pin_tag(self, original: str) -> PinnedRef:
        entry = self.lock.find(original)
        lookup = self._lookups.get(original)
        current = lookup.result() if lookup else self.content.digest(parse_reference(original))
        if entry is None:
            if self.locked:
                raise LockError(
                    f"{original} is not in {self.lock_display}",
                    hint="run `cocoonplan lock` and commit the lock file",
                )
            self.changes[original] = LockChange(ref=original, before=None, after=current)
            return PinnedRef(ref=original, digest=current)
        if entry.locked.digest != current:
            if self.locked:
                raise LockError(
                    f"tag {original} moved since it was locked: {entry.locked.digest} → {current}",
                    hint="review the new digest, then run `cocoonplan lock --update` and commit the lock file",
                )
            self.changes[original] = LockChange(ref=original, before=entry.locked.digest, after=current)
            if self.update:
                return PinnedRef(ref=original, digest=current)
        return PinnedRef(ref=original, digest=entry.locked.digest)
