"""The blob executor against real servers: the loopback docker-registry (blobs pushed with
oras-py), an OCI layout, and a hostile loopback HTTP server that drops, stalls, corrupts,
truncates and fails on purpose, counting every request."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress

from cocoonplan.context import ProjectContext
from cocoonplan.errors import CocoonplanError, DigestMismatchError, NotFoundError, PlanError, RegistryError
from cocoonplan.executors import blobs
from cocoonplan.executors.blobs import (
    BlobRequest,
    FetchedBlob,
    Outcome,
    PlainProgress,
    RichProgress,
    blob_path,
    fetch_blobs,
    progress_reporter,
)
from cocoonplan.oci.manifest import Descriptor
from cocoonplan.oci.registry import RegistryStore
from cocoonplan.oci.sources import Sources, open_sources
from cocoonplan.planner.model import BlobKind, PlannedBlob
from cocoonplan.project import Project, RegistrySource
from registry_server import RegistryServer, blob_digest, push_files

BLOB = bytes(range(256)) * 12_000  # 3 MB: several chunks, so a drop lands mid-body
OTHER = b"another layer\n" * 5000
REPOSITORY = "cocoon/layers"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


class Recorder:
    """A BlobProgress that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.received = 0
        self._lock = threading.Lock()

    def started(self, blob: BlobRequest) -> None:
        with self._lock:
            self.events.append(("started", blob.digest))

    def advanced(self, blob: BlobRequest, count: int) -> None:
        with self._lock:
            self.received += count

    def retrying(self, blob: BlobRequest, attempt: int, error: CocoonplanError, delay: float) -> None:
        with self._lock:
            self.events.append(("retrying", error.summary))

    def finished(self, fetched: FetchedBlob) -> None:
        with self._lock:
            self.events.append(("finished", fetched.outcome.value))


class Hostile:
    """Serves blobs at ``/v2/<repository>/blobs/<digest>``; each request takes the next scripted
    behaviour (then ``serve``: honours Range with a 206):

    ``drop``: half the body, then the connection closes; ``stall``: half, then nothing for
    longer than the client's timeout; ``ignore-range``: 200 with the whole blob; ``corrupt``:
    one byte flipped; ``truncate``: a Content-Length 1000 bytes short, body to match; ``503``.
    """

    def __init__(self, *contents: bytes) -> None:
        self.blobs = {blob_digest(content): content for content in contents}
        self.script: list[str] = []
        self.requests: list[tuple[str, str | None]] = []
        """(digest, Range header) of every request."""
        self.stall = 2.5
        """Seconds a ``stall`` waits: past the tests' 1 s client timeout."""
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def ranges(self, digest: str) -> list[str | None]:
        return [header for asked, header in self.requests if asked == digest]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self, digest: str, header: str | None) -> str:
        with self._lock:
            self.requests.append((digest, header))
            return self.script.pop(0) if self.script else "serve"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                digest = self.path.rsplit("/", 1)[-1]
                header = self.headers.get("Range")
                behaviour = hostile._next(digest, header)
                content = hostile.blobs.get(digest)
                if content is None or behaviour == "503":
                    self.send_response(404 if content is None else 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if header and behaviour != "ignore-range":
                    start = int(header.removeprefix("bytes=").rstrip("-"))
                body = content[start:]
                if behaviour == "corrupt":
                    body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
                elif behaviour == "truncate":
                    body = body[:-1000]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if behaviour in ("drop", "stall"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if behaviour == "stall":
                        time.sleep(hostile.stall)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    server = Hostile(BLOB, OTHER)
    yield server
    server.close()


def open_project(tmp_path: Path, **project: object) -> Sources:
    settings = {"cache": str(tmp_path / "cache"), **project}
    context = ProjectContext(project=Project.model_validate(settings), directory=tmp_path, file=None)
    return open_sources(context, httpx.Client(timeout=httpx.Timeout(1.0)), {})


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Sources]:
    with open_project(tmp_path) as opened:
        yield opened


def planned(content: bytes, source: str) -> PlannedBlob:
    return PlannedBlob(
        digest=blob_digest(content),
        size=len(content),
        media_type=LAYER_TYPE,
        source=source,
        present=False,
        kind=BlobKind.LAYER,
    )


def fetch(
    requests: list[PlannedBlob], sources: Sources, destination: Path, progress: Recorder | None = None
) -> list[FetchedBlob]:
    return fetch_blobs(
        requests, sources, destination, parallel=2, progress=progress or Recorder(), backoff=0.01
    )


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# --------------------------------------------------------------------------- the real registry


def test_blobs_pushed_with_oras_are_placed_once_and_then_found_present(
    registry: RegistryServer, sources: Sources, tmp_path: Path
) -> None:
    pushed = push_files(registry, "cocoon/exec", "v1", {"a.bin": BLOB, "b.bin": OTHER}, tmp_path / "push")
    source = f"{registry.host}/cocoon/exec"
    requests = [planned(BLOB, source), planned(OTHER, source), planned(BLOB, source)]
    assert {item["digest"] for item in pushed.manifest["layers"]} == {r.digest for r in requests}
    destination = tmp_path / "node" / "blobs"
    first = fetch(requests, sources, destination)
    assert [(f.digest, f.outcome, f.requests) for f in first] == [
        (blob_digest(BLOB), Outcome.DOWNLOADED, 1),
        (blob_digest(OTHER), Outcome.DOWNLOADED, 1),
    ]
    assert blob_path(destination, blob_digest(BLOB)).read_bytes() == BLOB
    assert first[1].path.read_bytes() == OTHER
    again = fetch(requests, sources, destination)
    assert [f.outcome for f in again] == [Outcome.PRESENT, Outcome.PRESENT]
    assert listing(destination) == sorted(f.path.name for f in first)


def test_the_registry_answers_a_ranged_read_with_the_rest(registry: RegistryServer, tmp_path: Path) -> None:
    push_files(registry, "cocoon/ranged", "v1", {"a.bin": BLOB}, tmp_path / "push")
    descriptor = Descriptor(mediaType=LAYER_TYPE, digest=blob_digest(BLOB), size=len(BLOB))
    with httpx.Client(timeout=5.0) as client:
        store = RegistryStore(registry.host, registry.url, client)
        with store.open_blob("cocoon/ranged", descriptor, 1_000_000) as body:
            assert body.start == 1_000_000
            assert b"".join(body.chunks) == BLOB[1_000_000:]


# --------------------------------------------------------------------------- a hostile server


def test_a_connection_dropped_mid_blob_is_resumed_with_range(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    hostile.script = ["drop"]
    progress = Recorder()
    [fetched] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d", progress)
    assert hostile.ranges(blob_digest(BLOB)) == [None, f"bytes={len(BLOB) // 2}-"]
    assert (fetched.outcome, fetched.requests) == (Outcome.DOWNLOADED, 2)
    assert fetched.path.read_bytes() == BLOB
    assert listing(tmp_path / "d") == [fetched.path.name]
    assert progress.received == len(BLOB)  # every byte reported once, none twice
    assert [kind for kind, _ in progress.events] == ["started", "retrying", "finished"]


def test_a_read_that_times_out_mid_blob_is_resumed(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    hostile.script = ["stall"]
    [fetched] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert hostile.ranges(blob_digest(BLOB)) == [None, f"bytes={len(BLOB) // 2}-"]
    assert fetched.path.read_bytes() == BLOB


def test_a_server_ignoring_range_sends_the_whole_blob_and_the_file_stays_right(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    hostile.script = ["drop", "ignore-range"]
    progress = Recorder()
    [fetched] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d", progress)
    assert hostile.ranges(blob_digest(BLOB)) == [None, f"bytes={len(BLOB) // 2}-"]
    assert fetched.path.read_bytes() == BLOB
    assert progress.received == len(BLOB)


@pytest.mark.parametrize(
    ("behaviour", "problem"),
    [("corrupt", "bytes hash to sha256:"), ("truncate", f"{len(BLOB) - 1000} bytes, expected {len(BLOB)}")],
)
def test_corrupt_or_truncated_bytes_fail_naming_blob_and_source_leaving_nothing(
    hostile: Hostile, sources: Sources, tmp_path: Path, behaviour: str, problem: str
) -> None:
    hostile.script = [behaviour]
    destination = tmp_path / "d"
    with pytest.raises(DigestMismatchError) as failure:
        fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, destination)
    message = str(failure.value)
    assert f"blob {blob_digest(BLOB)} of {hostile.host}/{REPOSITORY}" in message
    assert f"from registry http://{hostile.host}" in message
    assert problem in message
    assert listing(destination) == []  # neither the blob nor its temporary file
    assert len(hostile.requests) == 1  # a mismatch is not retried: the server said it was done


def test_503_twice_then_success_is_retried(hostile: Hostile, sources: Sources, tmp_path: Path) -> None:
    hostile.script = ["503", "503"]
    progress = Recorder()
    [fetched] = fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d", progress)
    assert (fetched.requests, fetched.path.read_bytes()) == (3, OTHER)
    retries = [summary for kind, summary in progress.events if kind == "retrying"]
    assert len(retries) == 2
    assert all("answered HTTP 503" in summary for summary in retries)


def test_retries_are_bounded_and_a_404_is_not_retried(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    hostile.script = ["503"] * 10
    with pytest.raises(RegistryError, match="answered HTTP 503"):
        fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert len(hostile.requests) == 5  # the first try and 4 retries
    hostile.requests.clear()
    with pytest.raises(NotFoundError):
        fetch([planned(b"never pushed", f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert len(hostile.requests) == 1
    assert listing(tmp_path / "d") == []


def test_one_digest_of_two_vms_is_downloaded_once_and_a_second_run_fetches_nothing(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    source = f"{hostile.host}/{REPOSITORY}"
    vm_a = [planned(BLOB, source), planned(OTHER, source)]
    vm_b = [planned(BLOB, f"{hostile.host}/other/repository")]
    fetched = fetch(vm_a + vm_b, sources, tmp_path / "d")
    assert sorted(digest for digest, _ in hostile.requests) == sorted([blob_digest(BLOB), blob_digest(OTHER)])
    assert [f.outcome for f in fetched] == [Outcome.DOWNLOADED, Outcome.DOWNLOADED]
    progress = Recorder()
    again = fetch(vm_a + vm_b, sources, tmp_path / "d", progress)
    assert len(hostile.requests) == 2
    assert [f.outcome for f in again] == [Outcome.PRESENT, Outcome.PRESENT]
    assert [kind for kind, _ in progress.events] == ["finished", "finished"]


def test_a_present_file_of_another_size_is_replaced(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    destination = tmp_path / "d"
    destination.mkdir()
    blob_path(destination, blob_digest(OTHER)).write_bytes(b"short")
    [fetched] = fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, destination)
    assert (fetched.outcome, fetched.path.read_bytes()) == (Outcome.DOWNLOADED, OTHER)


def test_a_link_under_the_final_name_is_refused(hostile: Hostile, sources: Sources, tmp_path: Path) -> None:
    destination = tmp_path / "d"
    destination.mkdir()
    (tmp_path / "elsewhere").write_bytes(OTHER)
    blob_path(destination, blob_digest(OTHER)).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CocoonplanError, match="is a symbolic link"):
        fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, destination)
    assert hostile.requests == []


def test_stale_temporary_files_of_a_killed_run_are_removed(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    destination = tmp_path / "d"
    destination.mkdir()
    stale = destination / f".{'ab' * 32}.{'0' * 16}.tmp"
    stale.write_bytes(b"half a blob")
    foreign = destination / ".notes.tmp"
    foreign.write_bytes(b"not ours")
    fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, destination)
    assert listing(destination) == sorted([foreign.name, blob_path(destination, blob_digest(OTHER)).name])


KILLED_RUN = """
import sys
from pathlib import Path
import httpx
from cocoonplan.context import ProjectContext
from cocoonplan.executors.blobs import PlainProgress, fetch_blobs
from cocoonplan.oci.sources import open_sources
from cocoonplan.planner.model import PlannedBlob
from cocoonplan.project import Project

blob = PlannedBlob.model_validate_json(sys.argv[1])
root = Path(sys.argv[2])
project = Project.model_validate({"cache": str(root / "cache")})
context = ProjectContext(project=project, directory=root, file=None)
with open_sources(context, httpx.Client(timeout=60.0), {}) as sources:
    fetch_blobs([blob], sources, root / "d", progress=PlainProgress(sys.stdout))
"""


def test_kill_9_mid_download_leaves_only_a_temporary_file_the_next_run_removes(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    hostile.script = ["stall"]
    hostile.stall = 30
    blob = planned(BLOB, f"{hostile.host}/{REPOSITORY}")
    destination = tmp_path / "d"
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, blob.model_dump_json(), str(tmp_path)])
    try:
        deadline = time.monotonic() + 20
        while not (destination.is_dir() and any(destination.iterdir())):
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        while (destination / listing(destination)[0]).stat().st_size < len(BLOB) // 2:
            assert time.monotonic() < deadline, "half the blob never arrived"
            time.sleep(0.05)
    finally:
        run.kill()  # SIGKILL: no cleanup runs
        run.wait()
    [partial] = listing(destination)
    assert blobs.STALE_TEMPORARY.fullmatch(partial)
    [fetched] = fetch([blob], sources, destination)
    assert fetched.path.read_bytes() == BLOB
    assert listing(destination) == [fetched.path.name]


def test_conflicting_requests_for_one_digest_are_refused(sources: Sources, tmp_path: Path) -> None:
    good = planned(OTHER, "127.0.0.1:1/a")
    with pytest.raises(PlanError, match=f"blob {blob_digest(OTHER)} is requested as"):
        fetch([good, good.model_copy(update={"size": 5})], sources, tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- the cache


def test_a_cached_blob_is_hard_linked_without_a_request(
    hostile: Hostile, sources: Sources, tmp_path: Path
) -> None:
    sources.cache.put(blob_digest(BLOB), BLOB)
    destination = tmp_path / "d"
    [fetched] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, destination)
    assert (fetched.outcome, fetched.requests, hostile.requests) == (Outcome.LINKED, 0, [])
    assert fetched.path.samefile(sources.cache.path_for(blob_digest(BLOB)))
    assert listing(destination) == [fetched.path.name]


def test_a_cached_blob_is_copied_when_it_cannot_be_linked(
    hostile: Hostile, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(blobs.os, "link", cross_device)
    sources.cache.put(blob_digest(BLOB), BLOB)
    [fetched] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert (fetched.outcome, hostile.requests) == (Outcome.COPIED, [])
    assert fetched.path.read_bytes() == BLOB
    assert not fetched.path.samefile(sources.cache.path_for(blob_digest(BLOB)))


def test_a_download_is_kept_in_the_cache_by_a_hard_link_and_never_copied_there(
    hostile: Hostile, sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = sources.cache.path_for(blob_digest(BLOB))
    [fetched] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert fetched.outcome is Outcome.DOWNLOADED and fetched.path.samefile(entry)
    [again] = fetch([planned(BLOB, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "e")
    assert (again.outcome, len(hostile.requests)) == (Outcome.LINKED, 1), "the next node's is linked"
    # Where the cache is on another file system a download is not copied into it.
    monkeypatch.setattr(blobs, "_same_file_system", lambda directory, file: False)
    [other] = fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert other.outcome is Outcome.DOWNLOADED
    assert not sources.cache.path_for(blob_digest(OTHER)).exists()


def test_a_corrupt_cache_entry_is_not_used(hostile: Hostile, sources: Sources, tmp_path: Path) -> None:
    entry = sources.cache.path_for(blob_digest(OTHER))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(OTHER[:-1] + b"?")  # the right size, other bytes
    [fetched] = fetch([planned(OTHER, f"{hostile.host}/{REPOSITORY}")], sources, tmp_path / "d")
    assert (fetched.outcome, fetched.path.read_bytes()) == (Outcome.DOWNLOADED, OTHER)
    assert listing(tmp_path / "d") == [fetched.path.name]


# --------------------------------------------------------------------------- an OCI layout


def test_a_blob_of_an_oci_layout_is_placed(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    (layout / "blobs" / "sha256" / blob_digest(BLOB).removeprefix("sha256:")).write_bytes(BLOB)
    with open_project(tmp_path, registries={"ghcr.io": RegistrySource(layout="layout")}) as sources:
        [fetched] = fetch([planned(BLOB, "ghcr.io/cocoonstack/layers")], sources, tmp_path / "d")
        assert (fetched.outcome, fetched.path.read_bytes()) == (Outcome.DOWNLOADED, BLOB)
        with pytest.raises(NotFoundError, match="not found in layout"):
            fetch([planned(OTHER, "ghcr.io/cocoonstack/layers")], sources, tmp_path / "d")


# --------------------------------------------------------------------------- progress reporters


def test_plain_lines_off_a_terminal(hostile: Hostile, sources: Sources, tmp_path: Path) -> None:
    hostile.script = ["503"]
    out = io.StringIO()
    with progress_reporter(out) as progress:
        assert isinstance(progress, PlainProgress)
        fetch_blobs(
            [planned(OTHER, f"{hostile.host}/{REPOSITORY}")],
            sources,
            tmp_path / "d",
            progress=progress,
            backoff=0.01,
        )
    short = blob_digest(OTHER).removeprefix("sha256:")[:12]
    assert out.getvalue().splitlines() == [
        f"fetching blob {short} (68.4 KiB) from {hostile.host}/{REPOSITORY}",
        f"retrying blob {short} in 0.01 s (retry 1): registry http://{hostile.host} answered HTTP 503 "
        f"for blob {blob_digest(OTHER)} of {REPOSITORY}",
        f"blob {short} (68.4 KiB): downloaded",
    ]


def test_rich_bars_on_a_terminal(hostile: Hostile, sources: Sources, tmp_path: Path) -> None:
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=True, width=100)) as bars:
        fetch_blobs(
            [planned(BLOB, f"{hostile.host}/{REPOSITORY}")],
            sources,
            tmp_path / "d",
            progress=RichProgress(bars),
        )
        [task] = bars.tasks
        assert (task.completed, task.total) == (len(BLOB), len(BLOB))
    assert blob_digest(BLOB).removeprefix("sha256:")[:12] in out.getvalue()
