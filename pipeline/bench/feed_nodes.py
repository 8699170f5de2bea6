"""``bench feed``'s cold start: K nodes, each with an empty cache of its own, read epoch 1 from one
S3 server at once, fault-free and then through the faults asked for.

    python -m pipeline bench feed --data data/synth-feed --nodes 4 --faults 503:10,cut:20
    python -m pipeline bench feed --data data/synth-feed --storm-s 60 --bandwidth-mbps 400

A node is a process (spawned, so nothing is shared but the server) running the training feed's
reader (``shard_reads.ShardReader`` over a ``ShardCache`` in its own folder, ``--fetchers`` shards at
once) over epoch 1's order, batch after batch; all start together. It reads the bytes only:
decoding is the same with or without faults, and K DALI pipelines would fight over this
machine's cores instead of the server's. Per node: epoch-1 images/s and that rate over the
server's ceiling divided by K (its fair share), the bytes the fetch engine received over the
training shards' bytes, its GETs, retries and seconds of backoff (``data/get_retries``,
``data/fetch_wait_s`` in a run), and every batch's samples compared with the local shards (what a
fault-free read gives): batches that differ, samples lost, samples repeated.

Faults (``--faults``, ``--storm-s``) touch the shard GETs only (``.tar``), not the manifest:

- ``--faults 503:10,cut:20,stall:50``: of the shard GETs, 1 in 10 answered ``503 SlowDown``, 1 in
  20 cut after half its body, 1 in 50 stalled (no byte for 5 s, then answered); any subset, in
  any order;
- ``--storm-s S``: every shard GET refused with 503 SlowDown for S seconds, from the first GET
  after each node's first ``--fetchers`` (early in epoch 1: the first window is on its way).

``--rounds N`` runs the cold start N times, fault-free and with faults alternating (a shared
machine's load then hits both); each reports its median round (by the nodes' mean rate), and the
rate of every round. ``--bandwidth-mbps`` caps what the server sends over all connections together (the whole
bench, the ceiling included): the ceiling a cluster's nodes share.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.common import BenchError

FAULT_KINDS = {"503": "slowdown_every", "cut": "cut_every", "stall": "stall_every"}


def parse_faults(spec: str) -> dict[str, int]:
    """``"503:10,cut:20"`` -> ``{"slowdown_every": 10, "cut_every": 20}`` (1 shard GET in N of each).

    Raises:
        BenchError: a part that is not ``KIND:N`` (KIND one of 503, cut, stall; N >= 1), or a kind twice.
    """
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        kind, _, every = part.partition(":")
        if kind not in FAULT_KINDS or not every.isdigit() or int(every) < 1:
            raise BenchError(
                f"--faults {spec!r}: {part!r} is not KIND:N (KIND one of {', '.join(FAULT_KINDS)}; "
                "N >= 1: 1 shard GET in N), e.g. --faults 503:10,cut:20"
            )
        if FAULT_KINDS[kind] in out:
            raise BenchError(f"--faults {spec!r}: {kind} given twice")
        out[FAULT_KINDS[kind]] = int(every)
    return out


def _digests(samples: list[Any]) -> list[str]:
    return [hashlib.blake2b(s, digest_size=8).hexdigest() for s in samples]


def _node(
    k: int, root: str, cache_dir: str, fetchers: int, window: int, batch: int, start: Any, out: Any
) -> None:
    """Node ``k``'s epoch 1 (in its own process), or its error, put on ``out``."""
    try:
        out.put({"node": k, **_epoch1(root, cache_dir, fetchers, window, batch, start)})
    except BaseException as e:  # noqa: BLE001 - the parent says which node failed and why
        start.abort()  # the other nodes stop waiting for this one
        out.put({"node": k, "error": f"{type(e).__name__}: {e}"})


def _epoch1(root: str, cache_dir: str, fetchers: int, window: int, batch: int, start: Any) -> dict[str, Any]:
    """Epoch 1 through an empty cache, timed from the moment every node is ready."""
    from pipeline.data.shard_cache import ShardCache
    from pipeline.data.shard_manifest import load_manifest
    from pipeline.data.shard_reads import ShardReader, epoch_order

    m = load_manifest(root)
    cache = ShardCache(m, cache_dir, fetchers)
    order = epoch_order(m, 0, 0, window)
    reader = ShardReader(m, cache, "train", lambda _epoch: order, batch)
    batches, waits = [], []
    start.wait(timeout=600)
    began = time.perf_counter()
    for step in range(len(order) // batch):
        t = time.perf_counter()
        batches.append(reader(order[step * batch : (step + 1) * batch], 0, step))  # views of the cache
        waits.append(time.perf_counter() - t)
    seconds = time.perf_counter() - began
    stats = cache.fetch_stats.snapshot()
    # Hashed once the clock has stopped: the views stay valid (a refetched shard replaces the
    # file, and a mapping keeps the one it mapped).
    digests = [_digests(b) for b in batches]
    cache.close()
    return {"seconds": seconds, "first_batch_s": waits[0], "batch_wait_p99_ms": float(np.percentile(waits, 99) * 1000),
            "fetch": stats, "digests": digests}  # fmt: skip


def expected_digests(m: Any, shards: Path, window: int, batch: int) -> list[list[str]]:
    """Each batch's sample digests as read straight from the local shards: a fault-free read."""
    from pipeline.data.shard_reads import epoch_order

    order, t = epoch_order(m, 0, 0, window), m.split("train")
    files: dict[str, bytes] = {}
    out = []
    for step in range(len(order) // batch):
        samples = []
        for i in order[step * batch : (step + 1) * batch]:
            name = m.shards[t.shard[i]].name
            if name not in files:
                files[name] = (shards / name).read_bytes()
            samples.append(files[name][t.offset[i] : t.offset[i] + t.size[i]])
        out.append(_digests(samples))
    return out


def cluster_epoch1(root: str, work: Path, *, nodes: int, fetchers: int, window: int, batch: int,
                   expected: list[list[str]], dataset_bytes: int, ceiling: float) -> list[dict[str, Any]]:  # fmt: skip
    """``nodes`` processes, each its own empty cache under ``work``, read epoch 1 at once."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(nodes), ctx.Queue()
    procs = [
        ctx.Process(
            target=_node, args=(k, root, str(work / f"node-{k}"), fetchers, window, batch, start, out)
        )
        for k in range(nodes)
    ]
    for p in procs:
        p.start()
    results = []
    try:
        while len(results) < nodes:
            try:
                results.append(out.get(timeout=5))
            except queue.Empty:
                dead = [k for k, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise BenchError(
                        f"cold start: node {dead[0]} exited with code {procs[dead[0]].exitcode}"
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    # The node that failed first, not one that stopped waiting for it.
    failed = sorted((r for r in results if "error" in r), key=lambda r: "BrokenBarrierError" in r["error"])
    if failed:
        raise BenchError(f"cold start: node {failed[0]['node']} failed: {failed[0]['error']}")
    want = Counter(d for b in expected for d in b)
    per_node = []
    for r in sorted(results, key=lambda r: r["node"]):
        got = Counter(d for b in r["digests"] for d in b)
        images = sum(len(b) for b in r["digests"])
        rate = images / r["seconds"]
        f = r["fetch"]
        per_node.append({
            "images": images, "seconds": r["seconds"], "images_per_s": rate, "vs_ceiling_share": rate / (ceiling / nodes),
            "first_batch_s": r["first_batch_s"], "batch_wait_p99_ms": r["batch_wait_p99_ms"],
            "gets": int(f["gets"]), "retries": int(f["retries"]), "throttled": int(f["throttled"]),
            "fetch_wait_s": f["wait_s"], "bytes_fetched_over_dataset": f["bytes"] / dataset_bytes,
            "batches_differing": sum(a != b for a, b in zip(r["digests"], expected, strict=True)),
            "samples_lost": sum((want - got).values()), "samples_repeated": sum((got - want).values()),
        })  # fmt: skip
    return per_node


def cold_start(args: Any, m: Any, shards: Path, work: Path, server: Any, ceiling: float) -> dict[str, Any]:
    """The cluster's epoch 1 fault-free, then through ``--faults`` / ``--storm-s`` when given,
    ``--rounds`` times; the median round of each counts."""
    from pipeline.bench.s3_latency import Faults

    bs, nodes = args.batch_size, args.nodes
    expected = expected_digests(m, shards, args.shuffle_window, bs)
    dataset = m.bytes_of("train")
    total_mbps = {"total_bandwidth_mbps": args.bandwidth_mbps} if args.bandwidth_mbps else {}
    asked: dict[str, Any] = parse_faults(args.faults) if args.faults else {}
    if args.storm_s > 0:
        asked.update(storm_s=args.storm_s, storm_from=nodes * args.fetchers + 1)
    runs = {"fault_free": Faults(**total_mbps)}
    if asked:
        runs["with_faults"] = Faults(**asked, **total_mbps, suffix=".tar")
    out: dict[str, Any] = {"nodes": nodes, "faults": asked, "dataset_train_bytes": dataset,
                           "ceiling_share_images_per_s": ceiling / nodes}  # fmt: skip
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in range(args.rounds):  # alternating, so that both meet the same load on a shared machine
        for name, faults in runs.items():
            server.set_faults(faults)
            server.reset()
            per_node = cluster_epoch1(m.root, work / f"{name}-{r}", nodes=nodes, fetchers=args.fetchers,
                                      window=args.shuffle_window, batch=bs, expected=expected, dataset_bytes=dataset,
                                      ceiling=ceiling)  # fmt: skip
            c = server.counts()
            rounds[name].append({
                "per_node": per_node,
                "images_per_s_per_node": float(np.mean([n["images_per_s"] for n in per_node])),
                "server": {k: c.get(k, 0) for k in ("GET.tar", "refused", "cut", "stalled")}
                | {"bytes_sent_over_dataset_x_nodes": c["get_bytes"] / (dataset * nodes)},
                "same_bytes_as_fault_free": all(
                    n["batches_differing"] == n["samples_lost"] == n["samples_repeated"] == 0 for n in per_node
                ),
            })  # fmt: skip
    for name, done in rounds.items():
        # The median round (the lower one of two) stands for the set; every round's rate is kept.
        rates = [d["images_per_s_per_node"] for d in done]
        median = sorted(done, key=lambda d: d["images_per_s_per_node"])[(len(done) - 1) // 2]
        out[name] = {**median, "rounds_images_per_s_per_node": rates,
                     "same_bytes_as_fault_free": all(d["same_bytes_as_fault_free"] for d in done)}  # fmt: skip
    server.set_faults(Faults(**total_mbps))
    if asked:
        out["faults_vs_fault_free"] = (
            out["with_faults"]["images_per_s_per_node"] / out["fault_free"]["images_per_s_per_node"]
        )
    return out


def format_text(c: dict[str, Any]) -> list[str]:
    """The cold start's lines of ``bench feed``'s summary."""
    lines = [f"cold start, {c['nodes']} node(s), an empty cache each; ceiling / nodes = "
             f"{c['ceiling_share_images_per_s']:.0f} img/s; faults: {c['faults'] or 'none'}"]  # fmt: skip
    for name in ("fault_free", "with_faults"):
        if name not in c:
            continue
        r = c[name]
        each = ", ".join(f"{x:.0f}" for x in r["rounds_images_per_s_per_node"])
        lines.append(f"  {name}: {r['images_per_s_per_node']:.0f} img/s per node (rounds: {each}; the median "
                     f"round below); server {r['server']}; "
                     f"same bytes as a fault-free read: {r['same_bytes_as_fault_free']}")  # fmt: skip
        for k, n in enumerate(r["per_node"]):
            lines.append(
                f"    node {k}: {n['images_per_s']:.0f} img/s ({n['vs_ceiling_share']:.2f}x its share), "
                f"bytes {n['bytes_fetched_over_dataset']:.2f}x the dataset, {n['gets']} GETs, {n['retries']} retries "
                f"({n['throttled']} throttled), {n['fetch_wait_s']:.1f} s backoff, lost {n['samples_lost']}, "
                f"repeated {n['samples_repeated']}, batches differing {n['batches_differing']}"
            )
    if "faults_vs_fault_free" in c:
        lines.append(f"  epoch-1 rate with faults / fault-free: {c['faults_vs_fault_free']:.2f}")
    return lines
