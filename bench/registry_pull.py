"""Pull-and-verify of one large blob: cocoonplan's registry client against oras-py, in one run.

Starts Debian's docker-registry on a free loopback port, pushes a blob with oras-py, then
downloads it with each client in a fresh subprocess, verifying the sha256 (oras-py does not,
so its run hashes the file afterwards, as a caller must). Prints wall time and peak RSS
growth of each, and the ratios cocoonplan/oras. Targets: time ratio <= 1.5, memory growth
ratio <= 1.5 (both stream; neither may hold the blob in memory).

    .venv/bin/python bench/registry_pull.py [--mib 256] [--rounds 3] [--with-retry]

``--with-retry`` also times a failing request against a closed port (oras-py retries for
about two minutes by default; cocoonplan fails at once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
kind, host, repo, digest, size, out = sys.argv[1:7]
size = int(size)
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if kind == "cocoonplan":
    import httpx
    from cocoonplan.oci.manifest import Descriptor
    from cocoonplan.oci.registry import RegistryStore
    base = rss()
    start = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        store = RegistryStore(host, f"http://{host}", client)
        store.download_blob(repo, Descriptor(mediaType="application/octet-stream", digest=digest, size=size), Path(out))
else:
    import oras.client
    base = rss()
    start = time.perf_counter()
    client = oras.client.OrasClient(hostname=host, insecure=True)
    client.download_blob(f"{host}/{repo}", digest, out)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == digest
print(json.dumps({"seconds": time.perf_counter() - start, "rss_growth": rss() - base}))
"""

RETRY = r"""
import sys, time
kind = sys.argv[1]
start = time.perf_counter()
try:
    if kind == "cocoonplan":
        import httpx
        from cocoonplan.oci.registry import RegistryStore
        with httpx.Client(timeout=5) as client:
            RegistryStore("127.0.0.1:9", "http://127.0.0.1:9", client).get_manifest("x/y", "v1")
    else:
        import oras.client
        oras.client.OrasClient(hostname="127.0.0.1:9", insecure=True).get_manifest("127.0.0.1:9/x/y:v1")
except Exception as exc:
    print(f"{type(exc).__name__} after {time.perf_counter() - start:.1f} s")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        sys.exit("docker-registry is not installed (apt-get install docker-registry)")
    host = f"127.0.0.1:{_free_port()}"
    config = work / "config.yml"
    config.write_text(
        f"version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n"
        f'storage: {{filesystem: {{rootdirectory: {work / "data"}}}}}\nhttp: {{addr: "{host}", secret: s}}\n'
    )
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(500):
        try:
            if httpx.get(f"http://{host}/v2/", timeout=0.5).status_code == 200:
                return process, host
        except httpx.TransportError:
            time.sleep(0.02)
    process.kill()
    sys.exit("docker-registry did not start")


def _push(host: str, repo: str, blob: Path) -> str:
    import oras.client
    import oras.oci
    import oras.provider

    oras.provider.Registry.do_request = oras.provider.Registry.do_request.__wrapped__  # type: ignore[attr-defined]
    client = oras.client.OrasClient(hostname=host, insecure=True)
    layer = oras.oci.NewLayer(str(blob), is_dir=False, media_type="application/octet-stream")
    client.upload_blob(str(blob), client.get_container(f"{host}/{repo}:bench"), layer, do_chunked=True)
    return str(layer["digest"])


def _measure(kind: str, host: str, repo: str, digest: str, size: int, out: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, host, repo, digest, str(size), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    out.unlink()
    measured: dict[str, float] = json.loads(result.stdout)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with-retry", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cocoonplan-bench-") as scratch:
        work = Path(scratch)
        blob = work / "blob"
        with blob.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        process, host = _start_registry(work)
        try:
            digest = _push(host, "bench/blob", blob)
            size = blob.stat().st_size
            # A discarded warm-up pull puts the registry's copy in the page cache for both; then
            # the clients alternate and each keeps its median run.
            _measure("oras", host, "bench/blob", digest, size, work / "w")
            runs: dict[str, list[dict[str, float]]] = {"cocoonplan": [], "oras": []}
            for _ in range(args.rounds):
                for kind in runs:
                    runs[kind].append(_measure(kind, host, "bench/blob", digest, size, work / kind))
            ours, peer = (
                sorted(runs[k], key=lambda m: m["seconds"])[args.rounds // 2] for k in ("cocoonplan", "oras")
            )
        finally:
            process.terminate()
            process.wait(timeout=5)
    print(f"blob: {args.mib} MiB, pulled and sha256-verified")
    for name, m in (("cocoonplan", ours), ("oras-py", peer)):
        print(f"  {name:11} {m['seconds']:6.2f} s   peak RSS growth {m['rss_growth'] / (1 << 20):7.1f} MiB")
    time_ratio = ours["seconds"] / peer["seconds"]
    memory_ratio = (ours["rss_growth"] + (1 << 20)) / (peer["rss_growth"] + (1 << 20))
    print(
        f"  ratio cocoonplan/oras: time {time_ratio:.2f} (target <= 1.5), memory {memory_ratio:.2f} (target <= 1.5)"
    )
    if args.with_retry:
        for kind in ("cocoonplan", "oras"):
            line = subprocess.run(
                [sys.executable, "-c", RETRY, kind], capture_output=True, text=True
            ).stdout.strip()
            print(f"  closed port, {kind}: {line}")
    if time_ratio > 1.5 or memory_ratio > 1.5:
        sys.exit(1)


if __name__ == "__main__":
    main()
