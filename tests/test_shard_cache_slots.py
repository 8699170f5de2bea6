"""One budget of shard fetches per node (``data.cache_fetchers``), shared by every process on the
cache folder: slot lock files held with ``flock``. Counted at the S3 test server (the most object
GETs it answered at once) and at the slots, never timed; every wait bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from shard_data import upload_sharded

from pipeline.data.cache_slots import SLOTS_FOLDER, FetchSlots
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_manifest import load_manifest

SLOTS = 2
LATENCY_S = 0.1  # each GET waits this long at the server, so fetches overlap when they may


@pytest.fixture(scope="module")
def s3_sharded(s3, sharded) -> str:
    return upload_sharded(sharded)


def test_a_slot_is_held_until_released_or_its_process_dies(tmp_path):
    slots = FetchSlots(tmp_path, SLOTS)
    with slots.taken(), slots.taken():  # two open files: flock holds each apart, even in one process
        assert slots._try() is None  # the budget is full
    fd = slots._try()
    assert fd is not None  # released on leaving the block
    os.close(fd)
    # A process that holds a slot and is killed: the kernel drops its flock, the slot is free.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(tmp_path / SLOTS_FOLDER / "0.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        other = FetchSlots(tmp_path, 1)  # one slot, held by the child
        assert other._try() is None
        holder.kill()
        holder.wait(timeout=30)
        fd = other._try()
        assert fd is not None
        os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


def test_three_handles_on_one_folder_keep_the_nodes_budget(s3, s3_sharded, tmp_path):
    """Three ranks of a node (separate cache handles, each with data.cache_fetchers=2 threads)
    prefetch every shard in three different orders, then read each: every shard is fetched once,
    the server never answers more than 2 shard GETs at once, and every rank finishes."""
    m = load_manifest(s3_sharded)
    shards = list(range(len(m.shards)))
    assert len(shards) >= 3 * SLOTS  # enough work for the ranks to want more than the budget
    folder = str(tmp_path / "node")
    ranks = [ShardCache(m, folder, SLOTS) for _ in range(3)]
    orders = [shards, shards[::-1], shards[len(shards) // 2 :] + shards[: len(shards) // 2]]
    errors: list[BaseException] = []

    def rank(cache: ShardCache, order: list[int]) -> None:
        try:
            cache.prefetch(order)
            for i in order:
                assert cache.ensure(i) is not None
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    s3.app.latency_s, before = LATENCY_S, s3.app.latency_s
    s3.reset()
    try:
        threads = [threading.Thread(target=rank, args=(c, o)) for c, o in zip(ranks, orders, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a rank is still waiting (deadlock)"
        counts = s3.counts()
    finally:
        s3.app.latency_s = before
        for cache in ranks:
            cache.close()
    assert errors == []
    assert counts["GET.tar"] == len(shards)  # each shard once on the node (one GET each: < 8 MiB)
    assert 1 <= counts["most_gets_at_once"] <= SLOTS, counts
    assert sum(c.slots.waits for c in ranks) > 0  # the ranks did want more than the budget at once
