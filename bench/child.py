"""One measured operation, in a process of its own (bench/run.py measures its wall time and
peak RSS with wait4); prints the seconds the operation itself took, as JSON.

    child.py pull HOST REPOSITORY DEST BLOBS_JSON   cocoonplan's blob executor (apply's path)
    child.py verify CACHE DEST BLOBS_JSON           the executor placing blobs from the cache
    child.py hashlib FILE...                        a bare hashlib.sha256 loop over the files
    child.py convert ROOT LAYER_JSON...             convert_layers into the node root ROOT
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Request:
    digest: str
    size: int
    media_type: str
    source: str


class Quiet:
    def started(self, blob: Any) -> None:
        pass

    def advanced(self, blob: Any, count: int) -> None:
        pass

    def retrying(self, blob: Any, attempt: int, error: Any, delay: float) -> None:
        pass

    def finished(self, fetched: Any) -> None:
        pass


def _fetch(cache: Path, dest: Path, source: str, blobs: list[dict[str, Any]]) -> float:
    import os

    from cocoonplan.api import Environment
    from cocoonplan.context import ProjectContext
    from cocoonplan.executors.blobs import fetch_blobs
    from cocoonplan.oci.sources import open_sources
    from cocoonplan.project import Project

    start = time.perf_counter()
    context = ProjectContext(project=Project(cache=str(cache)), directory=cache.parent, file=None)
    environment = Environment(env=dict(os.environ), cwd=cache.parent)
    requests = [
        Request(b["digest"], b["size"], "application/vnd.oci.image.layer.v1.tar", source) for b in blobs
    ]
    with environment.http() as client, open_sources(context, client, environment.env) as sources:
        fetched = fetch_blobs(requests, sources, dest, progress=Quiet())
    assert len(fetched) == len(blobs)
    return time.perf_counter() - start


def main() -> None:
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "pull":
        host, repository, dest, blobs = args
        seconds = _fetch(
            Path(dest) / "cache", Path(dest) / "blobs", f"{host}/{repository}", json.loads(blobs)
        )
    elif kind == "verify":
        cache, dest, blobs = args
        seconds = _fetch(Path(cache), Path(dest), "bench.invalid/none", json.loads(blobs))
    elif kind == "hashlib":
        start = time.perf_counter()
        for name in args:
            digest = hashlib.sha256()
            with Path(name).open("rb") as source:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
            assert name.endswith(digest.hexdigest())
        seconds = time.perf_counter() - start
    elif kind == "convert":
        from cocoonplan.executors.layers import LayerBlob, convert_layers

        root, *layers = args
        start = time.perf_counter()
        convert_layers([LayerBlob.model_validate(json.loads(item)) for item in layers], Path(root))
        seconds = time.perf_counter() - start
    else:
        sys.exit(f"unknown operation {kind}")
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
