"""A shard cache smaller than the dataset: eviction by next use, the limit and its check, the
ledger shared by two handles on one folder, temporary files of dead fetches, file modes.

Counts from the S3 test server (``shard_data``), never times; no Ray.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from shard_data import ROOT, upload_sharded

from pipeline.bench.feed import lru_gets_per_epoch
from pipeline.config import ConfigError, DataConfig
from pipeline.data.cache_ledger import LEDGER_NAME, Ledger, on_disk
from pipeline.data.cache_shards import SHARDS_FOLDER, shard_file
from pipeline.data.eviction import choose_victims
from pipeline.data.next_use import NEVER, ReadPlan
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_feed import open_sharded
from pipeline.data.shard_manifest import load_manifest
from pipeline.data.shard_reads import ShardReader, epoch_order

WINDOW, BATCH = 4, 8


@pytest.fixture(scope="module")
def s3_sharded(s3, sharded) -> str:
    return upload_sharded(sharded)


def _order(m, window=WINDOW):
    return _order_of_seed(m, 0, window)


def _order_of_seed(m, seed, window=WINDOW):
    return lambda epoch: epoch_order(m, seed, epoch, window)


def test_eviction_takes_the_furthest_next_read_and_never_the_current_window(sharded):
    m = load_manifest(sharded)
    plan = ReadPlan(m, _order(m), BATCH)
    plan.at(0, 5)
    protected = plan.protected()
    order = _order(m)(0)
    shard_of = m.split("train").shard
    batch = shard_of[order[5 * BATCH : 6 * BATCH]]
    assert set(batch.tolist()) <= protected  # what the current batch reads is protected...
    assert len(protected) <= 3 * WINDOW  # ...and no more than its windows
    train = m.shard_ids("train")
    names = {f"shards/{m.shards[i].sha256}.tar": i for i in train}
    cached = {n: (m.shards[i].size, 0) for n, i in names.items()}
    pinned = {n for n, i in names.items() if i in protected}
    mine = set(names)  # one job on the folder: what it names is all that live jobs name

    def next_use(ns):
        return plan.next_use([names[n] for n in ns])

    victims = choose_victims(cached, pinned, mine, mine, next_use, need=1)
    free = [n for n in names if n not in pinned]
    uses = next_use(free)
    assert victims == [free[int(np.argmax(uses))]]
    assert names[victims[0]] not in protected
    # The next uses are where the order really reads each shard next.
    for n, use in zip(free, uses, strict=True):
        rest = np.flatnonzero(shard_of[order] == names[n])
        ahead = rest[rest >= 5 * BATCH]
        expected = (
            ahead[0] if len(ahead) else len(order) + np.flatnonzero(shard_of[_order(m)(1)] == names[n])[0]
        )
        assert use == expected
    # A prefetch never pushes out a shard read sooner than the one it fetches.
    soonest = int(uses.min())
    assert choose_victims(cached, pinned, mine, mine, next_use, need=1, before=int(uses.max())) is None
    assert choose_victims(cached, pinned, mine, mine, next_use, need=1, before=soonest) == victims
    # Everything pinned: nothing can go.
    assert choose_victims(cached, set(cached), mine, mine, next_use, need=1) is None
    # Shards no live dataset names go first, oldest first; another live job's only for a read.
    others = {"shards/a.tar": (10, 2), "shards/b.tar": (10, 1), "shards/c.tar": (10, 0)}
    live = mine | {"shards/c.tar"}
    assert choose_victims({**cached, **others}, pinned, live, mine, next_use, need=15)[:2] == [
        "shards/b.tar",
        "shards/a.tar",
    ]
    assert NEVER not in uses


def _feed(m, cache, epochs, s3):
    """Every batch's bytes over ``epochs`` epochs, through the training reader; the most the
    cache folder held after any batch; the server's GETs in each epoch."""
    order = _order(m)
    reader = ShardReader(m, cache, "train", order, BATCH)
    steps = len(m.split("train")) // BATCH
    out, most, gets = [], 0, []
    for epoch in range(epochs):
        s3.reset()
        for step in range(steps):
            ids = order(epoch)[step * BATCH : (step + 1) * BATCH]
            out.append([x.tobytes() for x in reader(ids, epoch, step)])
            most = max(most, sum(size for size, _ in on_disk(cache.root).values()))
        gets.append(s3.counts()["GET"])
    return out, most, gets


def test_half_the_dataset_reads_the_same_samples_with_fewer_gets_than_lru(s3, s3_sharded, tmp_path):
    m = load_manifest(s3_sharded)
    shards = len(m.shard_ids("train"))
    epochs = 3
    full = ShardCache(m, str(tmp_path / "full"), 2)
    assert not full.bounded
    want, _, gets = _feed(m, full, epochs, s3)
    full.close()
    assert gets == [shards] + [0] * (epochs - 1)  # a whole copy: each shard once, then none
    limit = m.bytes_of("train") // 2
    half = ShardCache(m, str(tmp_path / "half"), 2, limit_bytes=limit)
    half.check_limit(WINDOW, BATCH)
    assert half.bounded
    got, most, gets = _feed(m, half, epochs, s3)
    evicted, fetched = half.room.evictions, half.fetch_stats.snapshot()["gets"]
    half.close()
    assert got == want  # the same samples in the same order, byte for byte
    assert most <= limit
    # One GET per fetch (the shards are smaller than a part); every refetch follows an eviction.
    assert sum(gets) == fetched and gets[0] == shards and sum(gets) <= shards + evicted
    lru = lru_gets_per_epoch(m, _order(m), BATCH, limit, epochs)  # a simulation over the same reads
    assert 0 < sum(gets[1:]) <= 0.6 * sum(lru[1:]), (gets, lru)


def test_a_limit_below_one_window_is_refused_naming_the_setting(s3, s3_sharded, tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.cache_limit_gb=1e-06: .*needs at least .*set data.cache_limit_gb="
    ):
        open_sharded(DataConfig(root=s3_sharded, cache_dir=str(tmp_path), cache_limit_gb=1e-6))
    m = load_manifest(s3_sharded)
    cache = ShardCache(m, str(tmp_path / "c"), 2, limit_bytes=1000)
    with pytest.raises(ConfigError, match=r"data.cache_limit_gb=1e-06: .*data.shuffle_window=4"):
        cache.check_limit(WINDOW, BATCH)
    cache.close()


def test_train_command_refuses_a_too_small_limit_before_starting(s3, s3_sharded, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/demo.yaml", "--no-ray",
         f"data.root={s3_sharded}", f"data.cache_dir={tmp_path}", "data.cache_limit_gb=0.000001"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, **s3.env},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "data.cache_limit_gb=0.000001" not in r.stderr  # the message gives the value as a number
    assert "set data.cache_limit_gb=" in r.stderr


def test_two_handles_on_one_folder_stay_under_the_limit_together(s3, s3_sharded, tmp_path):
    m = load_manifest(s3_sharded)
    folder = tmp_path / "shared"
    limit = m.bytes_of("train") // 2
    a = ShardCache(m, str(folder), 2, limit_bytes=limit)
    b = ShardCache(m, str(folder), 2, limit_bytes=limit)
    entries = json.loads((folder / LEDGER_NAME).read_text())["processes"]
    assert {a.room.ledger.key, b.room.ledger.key} <= set(entries)
    # Two jobs on one dataset, reading in different orders (seeds), batch by batch in turn.
    readers = [ShardReader(m, c, "train", _order_of_seed(m, seed), BATCH) for c, seed in ((a, 0), (b, 7))]
    most = 0
    for step in range(len(m.split("train")) // BATCH):
        for seed, reader in zip((0, 7), readers, strict=True):
            ids = epoch_order(m, seed, 0, WINDOW)[step * BATCH : (step + 1) * BATCH]
            reader(ids, 0, step)
            most = max(most, sum(size for size, _ in on_disk(folder).values()))
    assert most <= limit
    assert a.room.evictions + b.room.evictions > 0
    a.close()
    entries = json.loads((folder / LEDGER_NAME).read_text())["processes"]
    assert a.room is None and b.room.ledger.key in entries and len(entries) == 1
    b.close()
    # An entry of a process that is gone is dropped when the ledger is next opened.
    (folder / LEDGER_NAME).write_text(json.dumps({"processes": {"999999999:1:0": {"dataset": "x"}}}))
    with Ledger(folder).entries() as live:
        assert live == {}


def test_a_dead_fetchs_temporary_file_is_removed_at_start(s3, s3_sharded, tmp_path):
    m = load_manifest(s3_sharded)
    ShardCache(m, str(tmp_path), 1).close()
    folder = tmp_path / SHARDS_FOLDER
    dead = folder / f".{shard_file(m.shards[1].sha256)}.k1ll3d"
    live = folder / f".{shard_file(m.shards[2].sha256)}.fetch1ng"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"x" * 100)
    held = os.open(folder / f"{shard_file(m.shards[2].sha256)}.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # a fetch still running holds its shard's lock
    try:
        ShardCache(m, str(tmp_path), 1).close()
    finally:
        os.close(held)
    assert not dead.exists() and live.exists()


def test_cached_files_are_readable_by_other_users(s3, s3_sharded, tmp_path):
    m = load_manifest(s3_sharded)
    old = os.umask(0o077)
    try:
        cache = ShardCache(m, str(tmp_path / "c"), 1)
        path = cache.ensure(0)
        cache.close()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(path) == mode(path.with_name(path.name + ".ok")) == 0o644
    assert mode(path.with_name(path.name + ".lock")) == 0o644
    assert mode(tmp_path / "c" / LEDGER_NAME) == 0o664
    assert mode(path.parent) & 0o055 == 0o055  # the folder can be entered and listed


def test_a_node_prefetches_what_its_own_ranks_read_first(s3, s3_sharded, tmp_path):
    """A node running ranks 2 and 3 of 4 prefetches shards in the order those ranks read them
    (each its slice of every global batch), window by window, from the step it is at; not in
    the order the global batch reaches them."""
    from pipeline.data.rank_split import rank_train_order
    from pipeline.train.distributed import DistContext

    m = load_manifest(s3_sharded)
    world, node = 4, (2, 3)
    order = _order(m)
    shard_of = m.split("train").shard
    steps = len(shard_of) // BATCH

    def node_reads(epoch: int) -> np.ndarray:
        """The shards ranks 2 and 3 read in ``epoch``, step by step, as the feed gives them."""
        per_rank = [
            rank_train_order(len(shard_of), global_batch=BATCH, rank=r, world_size=world, seed=0, epoch=epoch,
                        perm=order(epoch)).reshape(steps, -1)
            for r in node
        ]  # fmt: skip
        return shard_of[np.concatenate(per_rank, axis=1)]  # (steps, the node's samples per step)

    def by_first_read(shards: np.ndarray) -> list[int]:
        _, first = np.unique(shards, return_index=True)
        return [int(shards[i]) for i in np.sort(first)]

    cache = ShardCache(m, str(tmp_path), 1)  # nothing prefetched: the plan and its order alone
    ShardReader(m, cache, "train", order, BATCH, node_ranks=DistContext(2, 4, 0, None, True, 2).node_ranks,
                world_size=world)  # fmt: skip
    whole = ReadPlan(m, order, BATCH)  # every rank's reads: one node
    for step in (0, steps // 2):
        cache.at(0, step)
        whole.at(0, step)
        mine = by_first_read(node_reads(0)[step:].reshape(-1))
        assert cache.ahead()[: len(mine)] == mine
        assert set(cache.ahead()[len(mine) :]).isdisjoint(mine)  # then the next epoch's others
        assert whole.upcoming()[: len(mine)] != mine  # the global order would fetch otherwise
    # Eviction looks at the node's next read of a shard too: at step 0, the first position (in
    # the global order) where rank 2 or 3 reads it.
    cache.at(0, 0)
    positions = np.arange(steps * BATCH).reshape(steps, BATCH)[:, BATCH // 2 :].reshape(-1)  # ranks 2, 3
    read = shard_of[order(0)[positions]]
    for s in by_first_read(read):
        assert int(cache.plan.next_use([s])[0]) == positions[np.flatnonzero(read == s)[0]]
    cache.close()
