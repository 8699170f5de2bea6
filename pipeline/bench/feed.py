"""``bench feed``: the training feed from local disk and from S3, one object per image vs shards.

    python -m pipeline data synth --out data/synth-feed --classes 8 --train-per-class 128 --val-per-class 4
    python -m pipeline bench feed --data data/synth-feed --latency-ms 30 --threads 2 --json

Behind ``pipeline.bench.s3_latency.LatencyS3`` (moto in this process, ``--latency-ms`` before each
GET), for each source it times a pass over the training images with DALI, read only (the
encoded bytes are the output) and read + decode (``fn.decoders.image`` on the CPU):

- ``local``: the folder layout on local disk (``fn.io.file.read``, ``--threads`` DALI threads);
- ``s3_per_image``: the folder layout in the bucket, one GET per image (DALI's S3 reader);
- ``sharded_epoch1``: ``data shard`` output in the bucket, an empty node cache (the real feed:
  ``epoch_order`` + ``ShardCache``, ``--fetchers`` whole-shard GETs at once);
- ``sharded_epoch2``: the same cache and reader, now full (each CRC-32 was checked in epoch 1);
- ``server_ceiling``: what the server itself delivers for the same shard bytes with
  ``--fetchers`` parallel whole-object GETs (no DALI), as images/s.

Per source: images/s (the median of ``--passes`` alternating passes where the bytes are on
disk), GETs and bytes fetched per image (the server's own counters), per-batch wait p50/p99
and the time to the first batch. ``s3_per_image`` reads at most
``--per-image-limit`` images (at 30 ms a GET it is slow by design).

``cold_start`` (``pipeline.bench.feed_nodes``): ``--nodes`` K processes, each with an empty
cache of its own, read epoch 1 from the server at once, fault-free and then through ``--faults``
(``503:10,cut:20``: 1 shard GET in 10 refused, 1 in 20 cut) and ``--storm-s`` when given; per
node its rate against the server's ceiling / K, bytes fetched over the dataset's, retries, fetch
wait, and every batch's bytes against a fault-free read. ``--bandwidth-mbps`` caps the server's
sending over all connections together, for the whole run.

``--cache-limit-mb N`` adds ``bounded_cache``: the training reader over ``--epochs`` epochs of the
real order (``epoch_order`` per epoch) through a cache limited to N MB, which evicts by next
use; its GETs per epoch are the server's counts, LRU's are a simulation over the same sequence
of shard reads with the same limit (said in the output), and every batch's bytes are compared
with those read straight from the local shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.common import BenchError, finish_machine, machine_info
from pipeline.bench.feed_nodes import format_text as nodes_text

HELP = "the training feed: local disk vs S3 one object per image vs shards (epoch 1 and 2), with latency"
BUCKET = "feed-bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, required=True, help="ImageNet-layout folder (local) with train/ and val/"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=30.0, help="wait before each GET (S3 Standard: ~30)"
    )
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--fetchers", type=int, default=4, help="shards fetched at once (data.cache_fetchers)"
    )
    # A small dataset in small shards: several windows of shards, as ImageNet has about 70.
    parser.add_argument(
        "--shard-size-mb", type=float, default=2.0, help="shard size (small: a small dataset)"
    )
    parser.add_argument("--shuffle-window", type=int, default=4, help="data.shuffle_window")
    parser.add_argument("--per-image-limit", type=int, default=256, help="images read one GET each from S3")
    parser.add_argument(
        "--cache-limit-mb", type=float, default=0.0, help="also run a cache of this many MB (0: no)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the bounded cache run")
    parser.add_argument("--nodes", type=int, default=1, help="cold start: nodes reading epoch 1 at once")
    parser.add_argument(
        "--rounds", type=int, default=1, help="cold start: rounds, fault-free and faulty alternating (median)"
    )
    parser.add_argument(
        "--faults", default="", help="cold start: shard GETs that fail, KIND:N,... (503:10,cut:20,stall:50)"
    )
    parser.add_argument(
        "--storm-s", type=float, default=0.0, help="cold start: seconds of 503 SlowDown early in epoch 1"
    )
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=0.0,
        help="the server's total sending rate, Mbit/s (0: no cap)",
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=5,
        help="passes over the data from disk (local, epoch 2): the median counts",
    )


class _Timed:
    """One pipe's passes over the data: built on the first, each pass timed.

    ``result()``: the median pass's images/s (and each pass's), per-batch wait p50/p99 over all
    passes, and the time to the first batch from the build (the first pass pays the build, as
    a run does). Alternating the passes of two pipes exposes both to the same load.
    """

    def __init__(self, pipe: Any, batches: int, batch_size: int):
        self.pipe, self.batches, self.batch_size = pipe, batches, batch_size
        self.waits: list[float] = []
        self.rates: list[float] = []
        self.first: float | None = None

    def one_pass(self) -> None:
        began = time.perf_counter()
        if not self.rates:
            self.pipe.build()
        for _ in range(self.batches):
            t = time.perf_counter()
            self.pipe.run()
            self.waits.append(time.perf_counter() - t)
            if self.first is None:
                self.first = time.perf_counter() - began
        self.rates.append(self.batches * self.batch_size / (time.perf_counter() - began))

    def result(self) -> dict[str, Any]:
        return {
            "images": self.batches * self.batch_size * len(self.rates),
            "passes": len(self.rates),
            "images_per_s": float(np.median(self.rates)),
            "images_per_s_each_pass": self.rates,
            "batch_wait_p50_ms": float(np.percentile(self.waits, 50) * 1000),
            "batch_wait_p99_ms": float(np.percentile(self.waits, 99) * 1000),
            "first_batch_s": self.first or 0.0,
        }


def _timed(pipe: Any, batches: int, batch_size: int) -> dict[str, Any]:
    """One timed pass of a new pipe."""
    timed = _Timed(pipe, batches, batch_size)
    timed.one_pass()
    return timed.result()


def _names_pipe(names: list[str], batch_size: int, threads: int, decode: bool) -> Any:
    from nvidia.dali import Pipeline, fn

    def feed():
        i = 0
        while True:
            batch = [names[(i + j) % len(names)] for j in range(batch_size)]
            i += batch_size
            yield [np.frombuffer(n.encode(), np.uint8) for n in batch]

    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    with pipe:
        jpegs = fn.io.file.read(fn.external_source(source=feed(), batch=True), dont_use_mmap=True)
        pipe.set_outputs(fn.decoders.image(jpegs, device="cpu") if decode else jpegs)
    return pipe


def _shard_pipe(reader: Any, order: np.ndarray, batch_size: int, threads: int, decode: bool) -> Any:
    from nvidia.dali import Pipeline, fn

    def feed():
        step = 0
        while True:
            ids = order[(step * batch_size) % len(order) :][:batch_size]
            if len(ids) < batch_size:
                ids = np.concatenate([ids, order[: batch_size - len(ids)]])
            yield reader(ids, 0, step)
            step += 1

    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    with pipe:
        jpegs = fn.external_source(source=feed(), batch=True)
        pipe.set_outputs(fn.decoders.image(jpegs, device="cpu") if decode else jpegs)
    return pipe


def _with_gets(r: dict[str, Any], server: Any, ext: str) -> dict[str, Any]:
    """``r`` with the GETs and bytes per image of ``ext`` objects the server counted since its reset."""
    c = server.counts()
    return {
        **r,
        "gets_per_image": c.get("GET" + ext, 0) / r["images"],
        "bytes_per_image": c["get_bytes"] / r["images"],
    }


def lru_gets_per_epoch(m: Any, order: Any, batch: int, limit: int, epochs: int) -> list[int]:
    """GETs per epoch of an LRU shard cache of ``limit`` bytes over the order's batches (a simulation)."""
    shard_of = m.split("train").shard
    held: dict[int, int] = {}  # shard -> bytes, least recently read first
    out = []
    for epoch in range(epochs):
        ids = order(epoch)
        gets = 0
        for s in shard_of[ids[: len(ids) // batch * batch]].tolist():
            if held.pop(s, None) is None:
                gets += 1
                while held and sum(held.values()) + m.shards[s].size > limit:
                    held.pop(next(iter(held)))
            held[s] = m.shards[s].size
        out.append(gets)
    return out


def _bounded(args: argparse.Namespace, m: Any, local: Path, cache_dir: Path, server: Any) -> dict[str, Any]:
    """The training reader through a cache of ``--cache-limit-mb`` over ``--epochs`` epochs."""
    from pipeline.data.shard_cache import ShardCache
    from pipeline.data.shard_reads import ShardReader, epoch_order

    limit, bs = int(args.cache_limit_mb * 1e6), args.batch_size
    cache = ShardCache(m, str(cache_dir), args.fetchers, limit_bytes=limit)
    cache.check_limit(args.shuffle_window, bs)

    def order(e: int) -> np.ndarray:
        return epoch_order(m, 0, e, args.shuffle_window)

    reader = ShardReader(m, cache, "train", order, bs)
    t, files = m.split("train"), {}
    gets, same = [], True
    for epoch in range(args.epochs):
        server.reset()
        for step in range(len(t) // bs):
            ids = order(epoch)[step * bs : (step + 1) * bs]
            for i, got in zip(ids, reader(ids, epoch, step), strict=True):
                name = m.shards[t.shard[i]].name
                if name not in files:
                    files[name] = (local / name).read_bytes()
                same &= got.tobytes() == files[name][t.offset[i] : t.offset[i] + t.size[i]]
        gets.append(server.counts().get("GET.tar", 0))
    evictions = cache.room.evictions
    cache.close()
    lru = lru_gets_per_epoch(m, order, bs, limit, args.epochs)
    return {"limit_mb": args.cache_limit_mb, "dataset_train_mb": m.bytes_of("train") / 1e6,
            "train_shards": len(m.shard_ids("train")), "epochs": args.epochs,
            "next_use_gets_per_epoch": gets, "lru_gets_per_epoch": lru, "lru": "simulated, same shard reads",
            "evictions": evictions,
            "ratio_after_epoch1": sum(gets[1:]) / max(1, sum(lru[1:])),
            "same_bytes_as_the_shards": bool(same)}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.bench.feed_nodes import cold_start, parse_faults
    from pipeline.bench.s3_latency import Faults, LatencyS3
    from pipeline.data.layout import scan_imagenet
    from pipeline.data.prep.shard_writer import write_shards
    from pipeline.data.shard_cache import ShardCache
    from pipeline.data.shard_manifest import load_manifest
    from pipeline.data.shard_reads import ShardReader, epoch_order
    from pipeline.store import locations

    if not (args.data / "train").is_dir():
        raise BenchError(
            f"{args.data}: no train/ folder; make one with `python -m pipeline data synth --out {args.data}`"
        )
    if min(args.nodes, args.rounds) < 1 or min(args.storm_s, args.bandwidth_mbps) < 0:
        raise BenchError(
            f"--nodes {args.nodes} --rounds {args.rounds} --storm-s {args.storm_s:g} --bandwidth-mbps "
            f"{args.bandwidth_mbps:g}: nodes and rounds must be >= 1, the storm and the cap >= 0"
        )
    if args.faults:
        parse_faults(args.faults)  # a bad spec is refused before minutes of other sources
    machine = machine_info()
    index = scan_imagenet(args.data)
    files = list(index.train_files)
    bs = args.batch_size
    batches = len(files) // bs
    if batches < 2:
        raise BenchError(f"{args.data}: {len(files)} training images, fewer than 2 batches of {bs}")
    mean_bytes = sum(os.path.getsize(f) for f in files) / len(files)
    work = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    result: dict[str, Any] = {"bench": "feed", "data": str(args.data), "latency_ms": args.latency_ms,
                              "threads": args.threads, "fetchers": args.fetchers, "batch_size": bs,
                              "images": len(files), "mean_image_bytes": mean_bytes,
                              "bandwidth_mbps": args.bandwidth_mbps}  # fmt: skip
    saved = dict(os.environ)
    try:
        cap = Faults(total_bandwidth_mbps=args.bandwidth_mbps)
        with LatencyS3(latency_ms=args.latency_ms, own_process=True, faults=cap) as server:
            os.environ.update(server.env)
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            server.create_bucket(BUCKET)
            import pyarrow.fs

            fs, _ = locations.filesystem(f"s3://{BUCKET}")
            shards = work / "shards"
            t = time.perf_counter()
            write_shards(str(args.data), str(shards), shard_size_mb=args.shard_size_mb, seed=0, progress=None)
            result["shard_seconds"] = time.perf_counter() - t
            result["shard_images_per_s"] = (len(files) + len(index.val_files)) / result["shard_seconds"]
            pyarrow.fs.copy_files(str(shards), f"{BUCKET}/shards", destination_filesystem=fs)
            pyarrow.fs.copy_files(
                str(args.data / "train"), f"{BUCKET}/folder/train", destination_filesystem=fs
            )
            m = load_manifest(f"s3://{BUCKET}/shards")
            order = epoch_order(m, 0, 0, args.shuffle_window)
            result["images_per_shard"] = len(m.split("train")) / len(m.shard_ids("train"))
            per = {}
            for decode in (False, True):
                tag = "read_decode" if decode else "read"
                limit = max(1, min(batches, args.per_image_limit // bs))
                train_dir = os.path.realpath(args.data / "train")
                remote = [
                    f"s3://{BUCKET}/folder/train/{os.path.relpath(os.path.realpath(f), train_dir)}"
                    for f in files
                ]
                server.reset()
                r = _timed(_names_pipe(remote, bs, args.threads, decode), limit, bs)
                per[f"s3_per_image_{tag}"] = _with_gets(r, server, os.path.splitext(files[0])[1])
                # One cache and one reader for both epochs, as a training process keeps them.
                cache = ShardCache(m, str(work / f"cache-{tag}"), args.fetchers)
                reader = ShardReader(m, cache, "train", lambda e: order, bs)
                server.reset()
                r = _timed(_shard_pipe(reader, order, bs, args.threads, decode), batches, bs)
                per[f"sharded_epoch1_{tag}"] = _with_gets(r, server, ".tar")
                # The two sources read from this machine's disk: their passes alternate.
                server.reset()
                local = _Timed(_names_pipe(files, bs, args.threads, decode), batches, bs)
                epoch2 = _Timed(_shard_pipe(reader, order, bs, args.threads, decode), batches, bs)
                for _ in range(args.passes):
                    local.one_pass()
                    epoch2.one_pass()
                per[f"local_{tag}"] = local.result()
                per[f"sharded_epoch2_{tag}"] = _with_gets(epoch2.result(), server, ".tar")
                cache.close()
            # The server's own ceiling: the same shard bytes, --fetchers parallel whole-object GETs.
            server.reset()
            names = [f"{BUCKET}/shards/{m.shards[i].name}" for i in m.shard_ids("train")]

            def get(name: str) -> int:
                with fs.open_input_file(name) as f:
                    return len(f.read_at(f.size(), 0))

            t = time.perf_counter()
            with ThreadPoolExecutor(args.fetchers) as pool:
                got = sum(pool.map(get, names))
            seconds = time.perf_counter() - t
            per["server_ceiling"] = {"images_per_s": len(m.split("train")) / seconds, "seconds": seconds,
                                     "bytes_per_s": got / seconds}  # fmt: skip
            result["sources"] = per
            ceiling = per["server_ceiling"]["images_per_s"]
            result["cold_start"] = cold_start(args, m, shards, work / "nodes", server, ceiling)
            if args.cache_limit_mb > 0:
                result["bounded_cache"] = _bounded(args, m, shards, work / "cache-bounded", server)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(work, ignore_errors=True)
    s = result["sources"]
    ratio = lambda a, b: s[a]["images_per_s"] / s[b]["images_per_s"]  # noqa: E731
    result["targets"] = {
        "epoch1_vs_per_image (>= 20)": ratio("sharded_epoch1_read", "s3_per_image_read"),
        "epoch1_vs_server_ceiling (>= 0.8)": ratio("sharded_epoch1_read", "server_ceiling"),
        "epoch2_vs_local (>= 0.9)": ratio("sharded_epoch2_read", "local_read"),
        "epoch1_gets_per_image_x_images_per_shard (<= 1.1)": s["sharded_epoch1_read"]["gets_per_image"]
        * result["images_per_shard"],
        "epoch2_data_gets": s["sharded_epoch2_read"]["gets_per_image"] * s["sharded_epoch2_read"]["images"],
    }
    c = result["cold_start"]
    result["targets"]["cold_start_slowest_node_vs_ceiling_share"] = min(
        n["vs_ceiling_share"] for n in c["fault_free"]["per_node"]
    )
    if "faults_vs_fault_free" in c:
        result["targets"]["cold_start_epoch1_with_faults_vs_fault_free"] = c["faults_vs_fault_free"]
    result["machine"] = finish_machine(machine)
    return result


def format_text(result: dict[str, Any]) -> str:
    lines = [
        f"feed on {result['data']}: {result['images']} images of {result['mean_image_bytes'] / 1e3:.0f} KB, "
        f"{result['latency_ms']:.0f} ms per GET, {result['threads']} DALI threads, {result['fetchers']} fetchers, "
        f"{result['images_per_shard']:.0f} images per shard",
        f"{'source':<28}{'img/s':>9}{'GETs/img':>10}{'KB/img':>8}{'wait p50':>10}{'p99 ms':>8}{'first s':>9}",
    ]
    for name, r in result["sources"].items():
        lines.append(
            f"{name:<28}{r['images_per_s']:>9.0f}{r.get('gets_per_image', float('nan')):>10.4f}"
            f"{r.get('bytes_per_image', float('nan')) / 1e3:>8.0f}{r.get('batch_wait_p50_ms', float('nan')):>10.1f}"
            f"{r.get('batch_wait_p99_ms', float('nan')):>8.1f}{r.get('first_batch_s', float('nan')):>9.2f}"
        )
    lines += [f"{k}: {v:.3g}" for k, v in result["targets"].items()]
    lines += nodes_text(result["cold_start"])
    b = result.get("bounded_cache")
    if b:
        lines += [
            f"cache of {b['limit_mb']:g} MB for {b['dataset_train_mb']:.1f} MB of training shards "
            f"({b['train_shards']}), {b['epochs']} epochs, GETs per epoch:",
            f"  next use (measured): {b['next_use_gets_per_epoch']}",
            f"  LRU ({b['lru']}): {b['lru_gets_per_epoch']}",
            f"  next use / LRU after epoch 1: {b['ratio_after_epoch1']:.2f}; same bytes as the shards: "
            f"{b['same_bytes_as_the_shards']}",
        ]
    return "\n".join(lines)
