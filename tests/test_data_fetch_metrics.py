"""What reading the sharded layout from object storage cost: the shard cache's counts of
retries, bytes, shard reads and cache hits (no retry without faults; a second rank of the node
hits what the first fetched). Counts, never times.
"""

from __future__ import annotations

import pytest
from shard_data import upload_sharded

from pipeline.bench.s3_latency import Faults
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_feed import fetch_counts
from pipeline.data.shards import load_manifest


@pytest.fixture(scope="module")
def s3_sharded(s3, sharded) -> str:
    return upload_sharded(sharded)


@pytest.fixture
def faults(s3):
    """``set(Faults(...))`` for this test; counts zeroed; no faults again afterwards."""
    s3.reset()
    yield s3.set_faults
    s3.set_faults(Faults())


def _read_all(cache: ShardCache, split: str = "train") -> None:
    s = cache.manifest.split(split)
    cache.read_samples(s.shard.tolist(), s.offset.tolist(), s.size.tolist(), [None] * len(s))


def test_cache_counts_retries_bytes_and_hits(s3, s3_sharded, faults, tmp_path):
    m = load_manifest(s3_sharded)
    train = m.shard_ids("train")
    s3.reset()  # the manifest's GET is not a shard's
    rank0 = ShardCache(m, str(tmp_path / "node"), fetchers=1)
    rank0.prefetch(train)
    _read_all(rank0)
    first = fetch_counts(rank0)
    assert (first["retries"], first["wait_s"], first["gets"]) == (0, 0.0, len(train))  # no faults, no retry
    assert first["bytes"] == m.bytes_of("train") == s3.counts()["get_bytes"]
    assert (first["shard_reads"], first["cache_hits"]) == (len(train), 0)  # all fetched by this process
    _read_all(rank0)  # the next period: every shard is read again, from the cache
    again = fetch_counts(rank0)
    assert (again["shard_reads"] - first["shard_reads"], again["cache_hits"]) == (len(train), len(train))
    assert again["gets"] == first["gets"]
    # Another rank of the node: what rank 0 fetched is served from the node's cache.
    rank1 = ShardCache(m, str(tmp_path / "node"), fetchers=1)
    _read_all(rank1)
    assert fetch_counts(rank1) == {**first, "gets": 0, "bytes": 0, "cache_hits": len(train)}
    rank0.close()
    rank1.close()
