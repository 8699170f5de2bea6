"""The sharded layout's ``data/*`` metrics: what reading from object storage cost, per epoch.

A one-process ``pipeline train --no-ray`` (run in this process, so the S3 test server's fault
counts can be read) over shards in a bucket whose server refuses every Nth shard GET with 503
SlowDown: the retries in ``metrics.jsonl`` equal the server's refusals, the first epoch fetched
every shard (no cache hit), the second found them all in the node's cache. The shard cache's
counts are checked directly too: no retry without faults, and a second rank of the node hits
what the first fetched. Counts, never times.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from shard_data import ROOT, small_config, upload_sharded

import pipeline.__main__
from pipeline.bench.s3_latency import Faults
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_feed import fetch_counts, open_sharded
from pipeline.data.shard_manifest import load_manifest
from pipeline.train.fetch_figures import FetchFigures

DATA_KEYS = {"data/get_retries", "data/fetch_wait_s", "data/bytes_fetched", "data/cache_hit_rate"}


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


@pytest.mark.slow  # trains (one process, --no-ray): not in make test-fast
def test_train_no_ray_reports_retries_and_hits_per_epoch(s3, s3_sharded, faults, tmp_path):
    m = load_manifest(s3_sharded)
    keep = tiny_overrides(Path("x"), tmp_path / "runs", "fetch")
    overrides = [o for o in keep if not o.startswith("data.root=")] + [
        f"data.root={s3_sharded}", f"data.cache_dir={tmp_path / 'cache'}",
        "cluster.num_workers=1", "schedule.epochs=2", "tracking.mode=disabled", "eval.final_mode=center",
    ]  # fmt: skip
    faults(Faults(slowdown_every=4, suffix=".tar"))
    command = ["train", "--config", str(ROOT / "configs/demo.yaml"), "--no-ray", *overrides]
    assert pipeline.__main__.main(command) == 0
    run = tmp_path / "runs" / "fetch"
    first, second = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    for record in (first, second):
        assert {k for k in record if k.startswith("data/")} == DATA_KEYS
    c = s3.counts()
    assert c["refused"] >= 1 and c["refused"] == c["GET.tar"] // 4  # every 4th shard GET: each costs a retry
    # Epoch 1 fetched every shard, training's and validation's, each refusal retried once.
    assert first["data/get_retries"] == c["refused"]
    assert first["data/bytes_fetched"] == sum(s.size for s in m.shards)
    assert first["data/cache_hit_rate"] == 0.0 and first["data/fetch_wait_s"] > 0
    # Epoch 2: the cache held everything; nothing was fetched.
    assert second["data/cache_hit_rate"] == 1.0
    assert second["data/get_retries"] == second["data/bytes_fetched"] == second["data/fetch_wait_s"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_get_retries"] == c["refused"]
    assert summary["data_bytes_fetched"] == first["data/bytes_fetched"]
    assert 0.5 <= summary["data_cache_hit_rate"] < 1.0  # the run: half its epochs, and the final eval, hit


def test_layouts_that_fetch_nothing_report_no_data_metrics(sharded):
    """Shards on a local disk (as image folders and CIFAR-10) fetch nothing: no ``data/*`` key."""
    cfg = small_config(sharded)
    data = open_sharded(cfg.data).loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=1,
                                          eval_batch=8)  # fmt: skip
    assert data.fetch_counts is None
    assert FetchFigures(data.fetch_counts, torch.device("cpu")).read("epoch") == {}
