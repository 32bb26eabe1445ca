"""The S3 blob store against Redis chunk lists: write and read speed, reader memory, Redis memory.

Usage::

    python bench/blob_store.py [--mib 64,256] [--repeats 3] [--chunk-mib 16] [--json]

One private redis-server (no persistence, ``bench/harness.py``) and one SeaweedFS
``weed server -s3`` (``tests/fixtures/objects.py``), both on loopback on this machine.
For each size, ``--repeats`` times, alternating which store goes first, one blob of
random bytes is written and read back through each store:

- **Redis** (the baseline): ``blobs.write`` (a chunk list of ``CROWDTRAIN_CHUNK_MIB``
  chunks) and ``blobs.read``.
- **S3**: ``ObjectStore.put`` (sha256, boto3 multipart upload, a presigned GET URL) then
  ``blobs.write_pointer``; read as a volunteer does, ``blobs.read(remote=UrlReader())``
  (the pointer from Redis, then a GET of its presigned URL, size and sha256 checked).

Every write and every read runs in a fresh Python process, so each has its own peak. The
process imports everything, connects, and does one tiny write or read to warm up; then its
peak counter is reset (``/proc/self/clear_refs``: 5) and its RSS is the baseline (for the
writer, after the payload is made). Seconds cover the operation only (no process start);
peak = ``VmHWM`` after the operation, above the baseline, in multiples of the blob. A reader
must hold the blob (1x); the design goal is the blob plus at most one chunk or read step.
"Redis bytes" is ``MEMORY USAGE`` of the blob's key once written. The reader's sha256 is
compared with the writer's (a mismatch aborts). Medians over the repeats; ratios are against
the Redis chunk lists measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
BUCKET = "ctbench"
RUN = "bench"
MODES = ("redis", "s3")
LABELS = {"redis": "Redis chunk lists", "s3": "S3 (SeaweedFS)"}


# --- the child: one write or one read, its seconds and peak ------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def _reset_peak() -> int:
    """Set this process's VmHWM to its current RSS; returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import redis

    from broker import blobs
    from broker.objects import Location, ObjectStore
    from broker.transfer import UrlReader

    client = redis.Redis.from_url(spec["redis"])
    mode, key, size = spec["mode"], spec["key"], spec["size"]
    out: dict[str, Any] = {}
    if spec["op"] == "write":
        store = ObjectStore(Location.parse(spec["location"])) if mode == "s3" else None
        # Warm up: one tiny blob through the same path (connections, boto3's lazy loading).
        if store is not None:
            warm = store.put(RUN, b"warm-up")
            blobs.write_pointer(client, key + ":warm", warm)
            store.delete([warm.object])
        else:
            blobs.write(client, key + ":warm", b"warm-up")
        client.delete(key + ":warm")
        payload = bytearray(os.urandom(size))
        out["sha256"] = hashlib.sha256(payload).hexdigest()
        base = _reset_peak()
        start = time.perf_counter()
        if store is not None:
            pointer = store.put(RUN, payload)
            blobs.write_pointer(client, key, pointer)
            out["object"] = pointer.object
        else:
            blobs.write(client, key, payload)
        out["seconds"] = time.perf_counter() - start
    else:
        remote = UrlReader() if mode == "s3" else None
        tiny = blobs.read(client, spec["warm"], remote=remote)  # a tiny blob of the same kind
        assert tiny is not None
        del tiny
        base = _reset_peak()
        start = time.perf_counter()
        data = blobs.read(client, key, remote=remote)
        out["seconds"] = time.perf_counter() - start
        assert data is not None and len(data) == size, "the blob was not read whole"
        out["peak"] = _status_kib("VmHWM") * 1024 - base
        out["sha256"] = hashlib.sha256(data).hexdigest()
        return out
    out["peak"] = _status_kib("VmHWM") * 1024 - base
    return out


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['op']} {spec['mode']} {spec['size']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the parent ----------------------------------------------------------------------------
def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from bench.harness import Cluster
    from broker import blobs
    from broker.objects import Location, ObjectStore
    from tests.fixtures.objects import SeaweedServer

    sizes = [int(float(m) * MIB) for m in args.mib.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="crowdtrain-bench-blobstore-"))
    cluster: Cluster | None = None
    weed: SeaweedServer | None = None
    results: dict[str, Any] = {"sizes": sizes, "runs": []}
    try:
        cluster = Cluster("blobstore")
        began = time.monotonic()
        weed = SeaweedServer(folder / "seaweed").start()
        weed.make_bucket(BUCKET)
        results["weed_start_s"] = time.monotonic() - began
        location = f"s3://{BUCKET}/bench"
        env = {
            **os.environ,
            **weed.env(),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            blobs.CHUNK_ENV: str(args.chunk_mib),
        }
        os.environ.update(weed.env())
        os.environ[blobs.CHUNK_ENV] = str(args.chunk_mib)
        store = ObjectStore(Location.parse(location))
        client: redis.Redis = cluster.client
        # The tiny blobs each reader warms up on.
        warm_keys = {"redis": "ct:bench:warm:redis", "s3": "ct:bench:warm:s3"}
        blobs.write(client, warm_keys["redis"], b"warm-up")
        warm_pointer = store.put(RUN, b"warm-up")
        blobs.write_pointer(client, warm_keys["s3"], warm_pointer)
        for size in sizes:
            for repeat in range(args.repeats):
                order = MODES if repeat % 2 == 0 else MODES[::-1]
                for mode in order:
                    key = f"ct:bench:{mode}:{uuid.uuid4().hex}"
                    spec = {
                        "mode": mode,
                        "key": key,
                        "size": size,
                        "redis": cluster.url,
                        "location": location,
                        "warm": warm_keys[mode],
                    }
                    wrote = run_child({**spec, "op": "write"}, env)
                    stored = int(client.execute_command("MEMORY USAGE", key, "SAMPLES", "0"))
                    read = run_child({**spec, "op": "read"}, env)
                    if read["sha256"] != wrote["sha256"]:
                        raise RuntimeError(f"{mode} {size}: the blob read back is not the one written")
                    client.delete(key)
                    if "object" in wrote:
                        store.delete([wrote["object"]])
                    row = {
                        "size": size,
                        "mode": mode,
                        "repeat": repeat,
                        "write_s": wrote["seconds"],
                        "read_s": read["seconds"],
                        "write_peak": wrote["peak"],
                        "read_peak": read["peak"],
                        "redis_bytes": stored,
                    }
                    results["runs"].append(row)
                    print(
                        f"# {size // MIB} MiB {mode:5} #{repeat}: write {row['write_s']:.2f} s, "
                        f"read {row['read_s']:.2f} s, reader peak {row['read_peak'] / size:.2f}x, "
                        f"Redis {stored} B",
                        file=sys.stderr,
                        flush=True,
                    )
        store.delete([warm_pointer.object])
    finally:
        if weed is not None:
            weed.stop()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(folder, ignore_errors=True)
    return results


def summarize(results: dict[str, Any]) -> dict[tuple[int, str], dict[str, float]]:
    out: dict[tuple[int, str], dict[str, float]] = {}
    for size in results["sizes"]:
        for mode in MODES:
            rows = [r for r in results["runs"] if r["size"] == size and r["mode"] == mode]
            out[(size, mode)] = {
                field: median([float(r[field]) for r in rows])
                for field in ("write_s", "read_s", "write_peak", "read_peak", "redis_bytes")
            } | {
                "write_min": min(r["write_s"] for r in rows),
                "write_max": max(r["write_s"] for r in rows),
                "read_min": min(r["read_s"] for r in rows),
                "read_max": max(r["read_s"] for r in rows),
            }
    return out


def human_bytes(n: float) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


def table(results: dict[str, Any]) -> str:
    stats = summarize(results)
    lines = [
        "| MiB | store | write s | write MiB/s | read s | read MiB/s "
        "| reader peak above baseline | writer peak above payload | Redis MEMORY USAGE |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"]:
        mib = size / MIB
        for mode in MODES:
            s = stats[(size, mode)]
            lines.append(
                f"| {mib:g} | {LABELS[mode]} "
                f"| {s['write_s']:.2f} ({s['write_min']:.2f}-{s['write_max']:.2f}) "
                f"| {mib / s['write_s']:.0f} "
                f"| {s['read_s']:.2f} ({s['read_min']:.2f}-{s['read_max']:.2f}) "
                f"| {mib / s['read_s']:.0f} "
                f"| {s['read_peak'] / size:.2f}x | {s['write_peak'] / size:.2f}x "
                f"| {human_bytes(s['redis_bytes'])} |"
            )
        r, o = stats[(size, "redis")], stats[(size, "s3")]
        # A Redis writer sends slices of its payload: its peak can be ~0, and a ratio meaningless.
        writer = (
            f"{o['write_peak'] / r['write_peak']:.2f}x"
            if r["write_peak"] >= 0.01 * size
            else f"+{human_bytes(o['write_peak'] - r['write_peak'])}"
        )
        lines.append(
            f"| {mib:g} | **S3 / Redis** | **{o['write_s'] / r['write_s']:.2f}x** "
            f"| {r['write_s'] / o['write_s']:.2f}x | **{o['read_s'] / r['read_s']:.2f}x** "
            f"| {r['read_s'] / o['read_s']:.2f}x | {o['read_peak'] / r['read_peak']:.2f}x "
            f"| {writer} "
            f"| **1/{r['redis_bytes'] / o['redis_bytes']:,.0f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", default="64,256", help="blob sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="A/B pairs per size, alternating order")
    parser.add_argument(
        "--chunk-mib", type=int, default=16, help="CROWDTRAIN_CHUNK_MIB for Redis chunk lists"
    )
    parser.add_argument("--json", action="store_true", help="also print every measurement as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    began = time.monotonic()
    results = measure(args)
    print(
        f"Blob store bench: sizes {args.mib} MiB, {args.repeats} repeats (alternating A/B), "
        f"chunks of {args.chunk_mib} MiB, SeaweedFS and redis-server on loopback, "
        f"{os.cpu_count()} cores, {time.monotonic() - began:.0f} s (weed started in "
        f"{results['weed_start_s']:.0f} s). Seconds: median (min-max); peaks: median, in "
        "multiples of the blob.\n"
    )
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
