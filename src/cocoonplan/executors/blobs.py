"""The blob executor: every blob a plan needs placed in one directory of the node, verified.

Guarantees:

* **once per digest.** Requests naming one digest (two VMs on one layer) are one download;
  requests of one digest that disagree on size or media type are refused before anything is
  fetched. At most ``parallel`` blobs are fetched at once, each in a thread of its own.
* **verified while streaming.** Bytes go into a temporary file of
  :func:`cocoonplan.atomic.atomic_writer` in the destination directory (created exclusively,
  never through a link), hashed and counted as they arrive (:class:`Verifier`: more bytes than
  the size stop the download at once). The file takes its final name ``<destination>/<hex>``
  only when exactly ``size`` bytes hash to the digest; otherwise it is removed and
  DigestMismatchError names the blob and its source. A body that ends cleanly but short is such
  a mismatch, not a reason to retry: the server said it was complete.
* **resumed, bounded.** A dropped or refused connection, a timeout or a 5xx answer
  (:func:`~cocoonplan.oci.registry.is_transient`) is retried up to ``retries`` times, after
  ``backoff``, 2×, 4×… seconds. A retry asks for the rest only (``Range: bytes=N-``) and the
  same hash state goes on over it. A server that ignores Range sends the whole blob again: the
  N bytes already in the file are skipped in it, so the hash still covers exactly the file.
* **from the cache, hashed once.** A blob in cocoonplan's cache (``<cache>/blobs/sha256/<hex>``,
  opened without following links) is hard-linked to a temporary name beside its final one,
  hashed through the link, then renamed into place; where linking fails (another file system,
  protected hard links) it is copied, hashed as it is copied (:meth:`BlobCache.hand_off`). The
  cache may be repository-relative, so its entries are verified on every read (its own rule);
  the bytes are never hashed a second time after that. An entry that fails is dropped, not used.
* **downloaded once per cache.** A downloaded blob is hard-linked into the cache as a verified
  entry when the cache lies on the destination's file system, so the next node's apply takes
  it from there instead of the registry. Not when the cache is on another file system: a copy
  would double a snapshot's gigabytes of memory on disk (and fill its holes).
* **present is not fetched.** A regular file of the right size under the final name is reported
  as present: only a verified file is ever renamed there. One of another size is replaced.
* **kill -9 safe.** Only temporary names ever hold partial bytes. Temporary files here are the
  atomic writer's ``.<name>.<16 hex>.tmp``, so ``.<64 hex>.<16 hex>.tmp`` in the destination
  are this executor's, and each run removes those first: left by a run that died. (One apply
  per node, under the node's lock, so no live run's files are among them.)

The progress reporter is the caller's choice (:func:`progress_reporter` picks bars on a
terminal, plain lines otherwise); reporters are called from the download threads.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

from cocoonplan.atomic import AtomicFile, atomic_writer, open_regular, remove_file
from cocoonplan.errors import CocoonplanError, PlanError, RegistryError
from cocoonplan.model import Model, digest_hex, short_digest
from cocoonplan.nodefs import Listing, Tree
from cocoonplan.oci.cache import BlobCache, Placed
from cocoonplan.oci.manifest import Descriptor
from cocoonplan.oci.reference import parse_reference
from cocoonplan.oci.registry import is_transient
from cocoonplan.oci.store import BlobReader, ContentStore
from cocoonplan.oci.verifier import Verifier, require_sha256
from cocoonplan.units import format_size

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

DEFAULT_PARALLEL = min(4, os.cpu_count() or 1)
"""Blobs fetched at once by default: a few streams fill a link; more only add contention."""
DEFAULT_RETRIES = 4
"""Retries of one blob after a transient failure, resumed where the bytes stopped."""
DEFAULT_BACKOFF = 0.5
"""Seconds before the first retry; each further one waits twice as long (0.5 + 1 + 2 + 4 in all)."""
STALE_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.[0-9a-f]{16}\.tmp")
"""The atomic writer's temporary names for ``<64 hex>`` files: partial blobs of a run that died."""

_HINT = "check that the destination directory is writable and has room, then run apply again"


class BlobRequest(Protocol):
    """A blob to place: the plan's ``PlannedBlob`` is one."""

    @property
    def digest(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def media_type(self) -> str: ...
    @property
    def source(self) -> str:
        """The canonical repository it is fetched from (``ghcr.io/cocoonstack/cocoon/ubuntu``)."""
        ...


class BlobSources(Protocol):
    """Where blobs come from: :class:`cocoonplan.oci.sources.Sources` is one."""

    @property
    def cache(self) -> BlobCache: ...
    def store_for(self, host: str) -> ContentStore: ...


class Outcome(StrEnum):
    """How a blob came to be in place."""

    DOWNLOADED = "downloaded"
    LINKED = "linked from the cache"
    COPIED = "copied from the cache"
    PRESENT = "already present"


_PLACED = {Placed.LINKED: Outcome.LINKED, Placed.COPIED: Outcome.COPIED}


class FetchedBlob(Model):
    """A blob in place under ``path``, verified."""

    digest: str
    size: int
    media_type: str
    source: str
    path: Path
    outcome: Outcome
    requests: int = 0
    """HTTP (or layout) reads it took: 1 for a download without failure, 0 when not downloaded."""


class BlobProgress(Protocol):
    """What the executor reports, from its download threads."""

    def started(self, blob: BlobRequest) -> None:
        """A download of ``blob`` begins."""

    def advanced(self, blob: BlobRequest, count: int) -> None:
        """``count`` more bytes of ``blob`` are in its temporary file."""

    def retrying(self, blob: BlobRequest, attempt: int, error: CocoonplanError, delay: float) -> None:
        """Retry number ``attempt`` of ``blob`` starts in ``delay`` seconds, after ``error``."""

    def finished(self, fetched: FetchedBlob) -> None:
        """``fetched`` is in place."""


def blob_path(destination: Path, digest: str) -> Path:
    """Where the executor places the blob ``digest`` under ``destination``."""
    return destination / digest_hex(digest)


def fetch_blobs(
    requests: Sequence[BlobRequest],
    sources: BlobSources,
    destination: Path,
    *,
    parallel: int = DEFAULT_PARALLEL,
    progress: BlobProgress,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> list[FetchedBlob]:
    """Place every requested blob in ``destination`` as described in the module docstring.

    Returns one :class:`FetchedBlob` per digest, in the order digests are first requested. The
    first failure (in that order) is raised once the downloads under way have ended; blobs not
    started by then are not fetched, those finished stay in place for the next run.
    """
    if parallel < 1:
        raise PlanError(f"cannot fetch blobs {parallel} at a time", hint="give a parallelism of 1 or more")
    unique = _deduplicate(requests)
    destination.mkdir(parents=True, exist_ok=True)
    _remove_stale(destination)
    fetch = partial(
        _fetch_one,
        sources=sources,
        destination=destination,
        progress=progress,
        retries=retries,
        backoff=backoff,
    )
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cocoonplan-blob") as pool:
        futures = [pool.submit(fetch, blob) for blob in unique]
        wait(futures, return_when=FIRST_EXCEPTION)
        pool.shutdown(wait=True, cancel_futures=True)
    failed = next((future for future in futures if _failed(future)), None)
    if failed is not None:
        failed.result()  # raises its error
    return [future.result() for future in futures]


def _failed(future: Future[FetchedBlob]) -> bool:
    return not future.cancelled() and future.exception() is not None


def _deduplicate(requests: Sequence[BlobRequest]) -> list[BlobRequest]:
    first: dict[str, BlobRequest] = {}
    for blob in requests:
        seen = first.setdefault(blob.digest, blob)
        if (seen.size, seen.media_type) != (blob.size, blob.media_type):
            raise PlanError(
                f"blob {blob.digest} is requested as {seen.size} bytes of {seen.media_type} (from "
                f"{seen.source}) and as {blob.size} bytes of {blob.media_type} (from {blob.source})",
                hint="one digest names one content; the plan is inconsistent, plan again",
            )
    return list(first.values())


def _remove_stale(destination: Path) -> None:
    with Tree.open(destination, "blob directory", _HINT) as tree:
        entries = tree.entries(".", Listing.NODE_DIR) or {}
    for name, mode in entries.items():
        if STALE_TEMPORARY.fullmatch(name) and stat.S_ISREG(mode):
            remove_file(destination, name)


def _fetch_one(
    blob: BlobRequest,
    *,
    sources: BlobSources,
    destination: Path,
    progress: BlobProgress,
    retries: int,
    backoff: float,
) -> FetchedBlob:
    # A digest becomes a file name: only sha256:<64 hex> may.
    name = require_sha256(blob.digest, f"blob from {blob.source}")
    done = partial(
        FetchedBlob,
        digest=blob.digest,
        size=blob.size,
        media_type=blob.media_type,
        source=blob.source,
        path=destination / name,
    )
    if _present(destination, name, blob.size):
        fetched = done(outcome=Outcome.PRESENT)
    elif (placed := _from_cache(sources.cache, blob, destination, name)) is not None:
        fetched = done(outcome=placed)
    else:
        download = _Download(blob, sources, progress)
        progress.started(blob)
        with atomic_writer(destination, name) as out:
            download.run(out, retries, backoff)
        _keep(sources.cache, blob, destination / name)
        fetched = done(outcome=Outcome.DOWNLOADED, requests=download.requests)
    progress.finished(fetched)
    return fetched


def _present(destination: Path, name: str, size: int) -> bool:
    existing = open_regular(destination, name)
    if existing is None:
        return False
    with existing:
        return os.fstat(existing.fileno()).st_size == size


def _descriptor(blob: BlobRequest) -> Descriptor:
    return Descriptor(mediaType=blob.media_type, digest=blob.digest, size=blob.size)


def _from_cache(cache: BlobCache, blob: BlobRequest, destination: Path, name: str) -> Outcome | None:
    """Place ``blob`` from its cache entry; None when there is no entry or it fails verification."""
    placed = cache.hand_off(_descriptor(blob), destination / name)
    return None if placed is None else _PLACED[placed]


def _keep(cache: BlobCache, blob: BlobRequest, path: Path) -> None:
    """Keep the verified download ``path`` as ``blob``'s cache entry when a hard link can: only
    on one file system (see the module docstring); a cache that cannot take it is its concern."""
    if _same_file_system(cache.root, path):
        cache.adopt(_descriptor(blob), path)


def _same_file_system(directory: Path, file: Path) -> bool:
    """Whether ``directory`` (or, while it does not exist, its nearest existing parent) lies on
    the file system of ``file``."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return directory.stat().st_dev == file.lstat().st_dev
    except OSError:
        return False


class _Download:
    """One blob's bytes from its source into an open temporary file, resumed across attempts."""

    def __init__(self, blob: BlobRequest, sources: BlobSources, progress: BlobProgress) -> None:
        reference = parse_reference(blob.source)
        store = sources.store_for(reference.registry)
        if not isinstance(store, BlobReader):
            raise RegistryError(
                f"{store.describe()} cannot stream blob {blob.digest}",
                hint="read this registry from a registry endpoint or an OCI layout",
            )
        self.blob = blob
        self.requests = 0
        self._store = store
        self._repository = reference.repository
        self._progress = progress
        what = f"blob {blob.digest} of {reference.name}"
        self._verifier = Verifier(blob.digest, blob.size, what, store.describe())

    def run(self, out: AtomicFile, retries: int, backoff: float) -> None:
        """Receive every byte into ``out`` and verify the whole; raise when that cannot be done."""
        for attempt in range(retries + 1):
            try:
                self._receive(out)
                break
            except RegistryError as exc:
                if attempt == retries or not is_transient(exc):
                    raise
                delay = backoff * 2**attempt
                self._progress.retrying(self.blob, attempt + 1, exc, delay)
                time.sleep(delay)
        self._verifier.finish()

    def _receive(self, out: AtomicFile) -> None:
        offset = self._verifier.count
        if offset == self.blob.size:
            return  # the connection failed after the last byte: a range past the end would be refused (416)
        self.requests += 1
        with self._store.open_blob(self._repository, _descriptor(self.blob), offset) as body:
            skip = offset - body.start  # bytes the file holds that a server ignoring Range sends again
            for received in body.chunks:
                chunk = received[skip:]
                skip -= len(received) - len(chunk)
                if chunk:
                    self._verifier.update(chunk)
                    out.write(chunk)
                    self._progress.advanced(self.blob, len(chunk))


class PlainProgress:
    """One line per blob started, retried and placed: for pipes and CI logs."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def started(self, blob: BlobRequest) -> None:
        self._line(f"fetching blob {short_digest(blob.digest)} ({format_size(blob.size)}) from {blob.source}")

    def advanced(self, blob: BlobRequest, count: int) -> None:
        """Nothing: a line per chunk would drown a log."""

    def retrying(self, blob: BlobRequest, attempt: int, error: CocoonplanError, delay: float) -> None:
        self._line(
            f"retrying blob {short_digest(blob.digest)} in {delay:g} s (retry {attempt}): {error.summary}"
        )

    def finished(self, fetched: FetchedBlob) -> None:
        self._line(f"blob {short_digest(fetched.digest)} ({format_size(fetched.size)}): {fetched.outcome}")

    def _line(self, text: str) -> None:
        with self._lock:
            print(text, file=self._stream, flush=True)


class RichProgress:
    """A progress bar per blob downloaded, on a terminal."""

    def __init__(self, bars: Progress) -> None:
        self._bars = bars
        self._tasks: dict[str, TaskID] = {}

    def started(self, blob: BlobRequest) -> None:
        self._tasks[blob.digest] = self._bars.add_task(short_digest(blob.digest), total=blob.size)

    def advanced(self, blob: BlobRequest, count: int) -> None:
        self._bars.advance(self._tasks[blob.digest], count)

    def retrying(self, blob: BlobRequest, attempt: int, error: CocoonplanError, delay: float) -> None:
        self._bars.console.print(
            f"retrying blob {short_digest(blob.digest)} in {delay:g} s: {error.summary}", markup=False
        )

    def finished(self, fetched: FetchedBlob) -> None:
        task = self._tasks.get(fetched.digest)
        if task is None:
            self._bars.console.print(f"blob {short_digest(fetched.digest)}: {fetched.outcome}", markup=False)
        else:
            self._bars.update(task, completed=fetched.size)


@contextlib.contextmanager
def progress_reporter(stream: TextIO) -> Iterator[BlobProgress]:
    """Bars when ``stream`` is a terminal and rich is installed, plain lines otherwise."""
    if stream.isatty():
        try:
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
        except ImportError:
            pass
        else:
            columns = (
                *Progress.get_default_columns(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
            )
            with Progress(*columns, console=Console(file=stream)) as bars:
                yield RichProgress(bars)
            return
    yield PlainProgress(stream)
