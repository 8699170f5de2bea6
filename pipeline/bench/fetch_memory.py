"""``python -m pipeline bench fetch``: the memory a node's shard fetches take, against their bound.

    python -m pipeline bench fetch --objects 8 --object-mb 128 --fetchers 4 --json

The fetch engine (``pipeline.data.fetch``) streams each object as ranged GETs of ``part_bytes``,
at most ``parts_in_flight`` of them held per object, into a file on the cache disk, hashing as
the bytes arrive. So ``--fetchers`` objects fetched at once hold at most fetchers x parts in flight
x part size in memory, whatever the objects' size. This measures it: ``--objects`` random objects
of ``--object-mb`` MB in a local S3 server (its own process, so its memory is not counted here),
fetched by ``--fetchers`` threads at once through one ``Fetcher`` into temporary files, as a
node's shard cache does; the process's peak resident memory (``VmHWM``, reset first through
``/proc/self/clear_refs``) above what it held before is the figure. Beside it the same objects
read whole (one ``read_at`` of the object, what a fetch did before the engine existed: each
fetcher held a whole shard).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench.common import BenchError, finish_machine, machine_info

HELP = "peak memory of fetching shards at once: the fetch engine's ranged parts vs whole objects"
MIB = 1024 * 1024
BUCKET = "fetch-memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objects", type=int, default=8, help="objects fetched (the shards)")
    parser.add_argument("--object-mb", type=float, default=128.0, help="each object's size in MiB")
    parser.add_argument(
        "--fetchers", type=int, default=4, help="objects fetched at once (data.cache_fetchers)"
    )
    parser.add_argument("--part-mb", type=float, default=8.0, help="bytes per ranged GET, MiB")
    parser.add_argument("--parts-in-flight", type=int, default=4, help="ranged GETs of one object at once")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="the server's wait before each GET")


def _check(args: argparse.Namespace) -> None:
    for flag in ("objects", "fetchers", "parts_in_flight"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.object_mb <= 0 or args.part_mb <= 0:
        raise BenchError(f"--object-mb and --part-mb must be positive, got {args.object_mb}, {args.part_mb}")
    if not Path("/proc/self/clear_refs").exists():
        raise BenchError("needs Linux's /proc/self/clear_refs and VmHWM to measure peak memory")


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmHWM``: the peak resident size
    since the last reset; ``VmRSS``: the resident size now), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def _measure(fetch_one: Callable[[int], None], objects: int, fetchers: int) -> dict[str, float]:
    """Fetch ``objects`` with ``fetchers`` threads at once; the peak resident growth and the time."""
    next_object, lock = iter(range(objects)), threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(next_object, None)
            if i is None:
                return
            try:
                fetch_one(i)
            except BaseException as e:  # noqa: BLE001 - reported after the join
                errors.append(e)
                return

    _reset_peak()
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(fetchers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"peak_growth_mib": (_status_bytes("VmHWM") - before) / MIB, "seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    from pipeline.bench.s3_latency import LatencyS3
    from pipeline.data.fetch import Fetcher, FetchPolicy
    from pipeline.store import locations

    machine = machine_info()
    size = int(args.object_mb * MIB)
    policy = FetchPolicy(part_bytes=int(args.part_mb * MIB), parts_in_flight=args.parts_in_flight)
    saved = dict(os.environ)
    try:
        with (
            LatencyS3(latency_ms=args.latency_ms, own_process=True) as server,
            tempfile.TemporaryDirectory() as tmp,
        ):
            os.environ.update(server.env)
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            server.create_bucket(BUCKET)
            fs, _ = locations.filesystem(f"s3://{BUCKET}")
            for i in range(args.objects):  # written in pieces: this process never holds one whole
                with fs.open_output_stream(f"{BUCKET}/shard-{i:04d}.tar") as out:
                    for at in range(0, size, 16 * MIB):
                        out.write(os.urandom(min(16 * MIB, size - at)))
            engine = Fetcher(policy, gets_in_flight=args.fetchers * args.parts_in_flight)

            def streamed(i: int) -> None:
                with open(Path(tmp) / f"{i}.tar", "wb") as sink:
                    engine.fetch(f"s3://{BUCKET}/shard-{i:04d}.tar", size, sink)

            def whole(i: int) -> None:
                handle = fs.open_input_file(f"{BUCKET}/shard-{i:04d}.tar")
                (Path(tmp) / f"{i}.tar").write_bytes(handle.read_at(size, 0))
                handle.close()

            streamed(0)  # the client and the threads exist before the measured pass
            warm_up = engine.stats.snapshot()["gets"]
            with engine:
                engine_pass = _measure(streamed, args.objects, args.fetchers)
                gets = engine.stats.snapshot()["gets"] - warm_up
            whole_pass = _measure(whole, args.objects, args.fetchers)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    bound = args.fetchers * args.parts_in_flight * policy.part_bytes / MIB
    return {
        "bench": "fetch",
        "objects": args.objects,
        "object_mib": size / MIB,
        "fetchers": args.fetchers,
        "part_mib": policy.part_bytes / MIB,
        "parts_in_flight": args.parts_in_flight,
        "bound_mib": bound,
        "engine": {**engine_pass, "gets": gets, "of_bound": engine_pass["peak_growth_mib"] / bound},
        "whole_objects": {**whole_pass, "fetchers_x_object_mib": args.fetchers * size / MIB},
        "machine": finish_machine(machine),
    }


def format_text(result: dict[str, Any]) -> str:
    e, w = result["engine"], result["whole_objects"]
    return "\n".join([
        f"fetch memory: {result['objects']} objects of {result['object_mib']:.0f} MiB, {result['fetchers']} at once, "
        f"parts of {result['part_mib']:.0f} MiB x {result['parts_in_flight']} in flight",
        f"fetch engine : peak +{e['peak_growth_mib']:.0f} MiB (bound {result['bound_mib']:.0f} MiB, "
        f"{e['of_bound']:.2f}x) in {e['seconds']:.1f}s, {e['gets']} GETs",
        f"whole objects: peak +{w['peak_growth_mib']:.0f} MiB (fetchers x object {w['fetchers_x_object_mib']:.0f} MiB) "
        f"in {w['seconds']:.1f}s",
    ])  # fmt: skip
