"""The fetch engine against an S3 server that misbehaves as S3 does: isolated 503 SlowDown, bodies
cut mid-way, a stalled GET, a storm of refusals; the bytes come back identical and every retry is
counted (the server's counts of faults equal the engine's retries: counts, never times). A budget
shorter than the storm is an error that says "throttled"; a 403 and a 404 say what to do. The
node's shard cache fills through a storm, a failed prefetch is not final, and `data shard` writes
to a bucket through a storm (its read-back waits it out instead of calling it a mismatch).

The server is ``pipeline.bench.s3_latency.LatencyS3`` with ``Faults``; the engine is
``pipeline.data.fetch``. Small parts (64 KiB) make several ranged GETs per object.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.client import IncompleteRead

import pytest
from shard_data import BUCKET, ROOT, SHARD_MB, upload_sharded

from pipeline.bench.s3_latency import Faults
from pipeline.data.fetch import Fetcher, FetchError, FetchPolicy, stored_sha256
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_manifest import load_manifest
from pipeline.store import locations

PART = 64 * 1024
# Quick backoff (the waits are not what is tested); a client timeout well under the stall, and
# long enough that no GET of a busy CI machine is mistaken for one.
QUICK = FetchPolicy(part_bytes=PART, parts_in_flight=3, request_timeout_s=2, backoff_s=0.01, backoff_max_s=0.1,
                    retry_s=60)  # fmt: skip
BLOB = os.urandom(10 * PART + 1234)  # 11 parts, the last one short
KEY = f"s3://{BUCKET}/fetch/blob.bin"


@pytest.fixture(scope="module")
def blob(s3) -> str:
    locations.write_bytes(KEY, BLOB)
    return KEY


@pytest.fixture
def faults(s3):
    """``set(Faults(...))`` for this test; counts zeroed; no faults again afterwards."""
    s3.reset()
    yield s3.set_faults
    s3.set_faults(Faults())


def _get(s3, key: str, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of one plain, unsigned GET (moto does not check signatures)."""
    try:
        with urllib.request.urlopen(f"{s3.endpoint}/{key}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- the faulty server


def test_server_faults_are_counted(s3, blob, faults):
    path = f"{BUCKET}/fetch/blob.bin"
    faults(Faults(slowdown_every=2, cut_every=3, suffix=".bin"))
    answers = [_get(s3, path) for _ in range(2)]
    assert answers[0] == (200, BLOB)
    assert answers[1][0] == 503 and b"<Code>SlowDown</Code>" in answers[1][1]
    with pytest.raises(IncompleteRead):  # the 3rd: half the body, then the connection closes
        _get(s3, path)
    c = s3.counts()
    assert (c["GET"], c["refused"], c["cut"], c["get_bytes"]) == (3, 1, 1, len(BLOB) + len(BLOB) // 2)

    faults(Faults(stall_every=1, stall_s=1.5, suffix=".bin"))
    with pytest.raises(TimeoutError):
        _get(s3, path, timeout=0.3)
    faults(Faults(storm_from=2, storm_s=60, deny="denied.bin", suffix=".bin"))
    assert [_get(s3, path)[0] for _ in range(3)] == [200, 503, 503]
    status, body = _get(s3, f"{BUCKET}/fetch/denied.bin")
    assert status == 403 and b"<Code>AccessDenied</Code>" in body
    faults(Faults(bandwidth_mbps=400, suffix=".bin"))
    assert _get(s3, path) == (200, BLOB)
    c = s3.counts()
    assert (c["stalled"], c["refused"], c["denied"], c["GET.bin"]) == (1, 1 + 2, 1, 9)
    # Other keys are not touched by faults limited to a suffix.
    faults(Faults(slowdown_every=1, suffix=".tar"))
    assert _get(s3, path) == (200, BLOB)


# ---------------------------------------------------------------- the engine against each fault


@pytest.mark.parametrize(
    "fault, counted",
    [
        (Faults(slowdown_every=3), "refused"),
        (Faults(cut_every=4), "cut"),
        (Faults(stall_every=8, stall_s=5), "stalled"),
        (Faults(storm_from=2, storm_s=1.0), "refused"),
    ],
    ids=["isolated 503s", "cut bodies", "a stall", "a storm"],
)
def test_engine_rides_out_each_fault(s3, blob, faults, fault, counted, tmp_path):
    faults(fault)
    with Fetcher(QUICK, gets_in_flight=3) as fetcher, open(tmp_path / "got", "wb") as out:
        sha = fetcher.fetch(blob, len(BLOB), out)
        stats = fetcher.stats.snapshot()
    assert (tmp_path / "got").read_bytes() == BLOB and sha == hashlib.sha256(BLOB).hexdigest()
    c = s3.counts()
    assert c[counted] >= 1
    # Every refused, cut or stalled GET was retried once, and only those; one HEAD for the size.
    assert stats["retries"] == c["refused"] + c["cut"] + c["stalled"] == c[counted]
    assert stats["throttled"] == c["refused"]
    assert stats["gets"] == c["GET"] == 11 + stats["retries"] and c["HEAD"] == 1
    assert stats["bytes"] == len(BLOB)


def test_a_budget_shorter_than_the_storm_says_throttled(s3, blob, faults):
    faults(Faults(storm_s=60))
    with Fetcher(FetchPolicy(part_bytes=PART, backoff_s=0.01, backoff_max_s=0.05, retry_s=0.3)) as fetcher:
        with pytest.raises(
            FetchError, match=r"blob.bin: throttled: S3 answered 503 SlowDown for \d+ tries"
        ) as e:
            fetcher.fetch(blob, len(BLOB))
        assert e.value.status == 503 and "raise data.fetch_retry_s or lower data.cache_fetchers" in str(
            e.value
        )
        assert fetcher.stats.snapshot()["retries"] >= 1


def test_forbidden_and_missing_objects_are_named_at_once(s3, blob, faults):
    faults(Faults(deny=".bin"))
    with Fetcher(QUICK) as fetcher:
        with pytest.raises(FetchError, match=r"blob.bin: access denied \(403.*credentials") as e:
            fetcher.fetch(blob, len(BLOB))
        assert e.value.status == 403
        with pytest.raises(
            FetchError, match=r"gone.bin: not found \(404.*re-run `python -m pipeline data shard"
        ):
            fetcher.fetch(f"s3://{BUCKET}/fetch/gone.bin", 100)
        assert fetcher.stats.snapshot()["retries"] == 0  # no retry can help these


def test_read_back_waits_out_a_storm(s3, blob, faults):
    faults(Faults(storm_from=1, storm_s=0.5))
    assert stored_sha256(blob, len(BLOB), QUICK) == hashlib.sha256(BLOB).hexdigest()
    assert s3.counts()["refused"] >= 1
    assert stored_sha256(blob, len(BLOB) - 1, QUICK) is None  # another size: not the shard written
    assert stored_sha256(f"s3://{BUCKET}/fetch/gone.bin", 10, QUICK) is None


# ---------------------------------------------------------------- the shard cache and `data shard`


@pytest.fixture(scope="module")
def s3_sharded(s3, sharded) -> str:
    return upload_sharded(sharded)


def test_shard_cache_fills_through_a_storm(s3, s3_sharded, sharded, faults, tmp_path):
    m = load_manifest(s3_sharded)
    faults(Faults(storm_from=3, storm_s=1.0, suffix=".tar"))
    cache = ShardCache(m, str(tmp_path / "cache"), fetchers=2, policy=QUICK)
    ids = m.shard_ids("train")
    cache.prefetch(ids)
    train = m.split("train")
    got = cache.read_samples(
        train.shard.tolist(), train.offset.tolist(), train.size.tolist(), train.crc32.tolist()
    )
    for k, data in enumerate(got):
        shard = (sharded / m.shards[train.shard[k]].name).read_bytes()
        assert data.tobytes() == shard[train.offset[k] : train.offset[k] + train.size[k]]
    stats, c = cache.fetch_stats.snapshot(), s3.counts()
    cache.close()
    assert c["refused"] >= 1 and stats["retries"] == c["refused"]
    parts = sum(-(-m.shards[i].size // PART) for i in ids)
    assert c["GET.tar"] == parts + c["refused"]  # each shard's parts fetched once, plus the retries


def test_a_failed_prefetch_is_fetched_again_by_the_reader(s3, s3_sharded, faults, tmp_path):
    m = load_manifest(s3_sharded)
    no_retries = FetchPolicy(retry_s=0)
    cache = ShardCache(m, str(tmp_path / "cache"), fetchers=1, policy=no_retries)
    faults(Faults(storm_s=60, suffix=".tar"))
    cache.prefetch([0])
    deadline = time.monotonic() + 30
    while s3.counts()["refused"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    faults(Faults())  # the storm is over; the prefetch failed (no retries) and keeps its error
    t = m.split("train")
    first = cache.read(0, int(t.offset[0]), int(t.size[0]), int(t.crc32[0]))
    assert len(first) == t.size[0] and s3.counts()["GET.tar"] == 2  # the refused prefetch, then the read
    cache.close()


@pytest.mark.slow  # waits out an 8 s storm: `make test`, not the inner loop
def test_shard_command_writes_to_a_bucket_through_a_storm(s3, src, faults):
    """The read-back of the second shard meets a storm longer than the AWS SDK's own retries
    (about 6 s): it is retried until the storm ends, and the run succeeds."""
    faults(Faults(storm_from=2, storm_s=8.0, suffix=".tar"))
    out = f"s3://{BUCKET}/stormy"
    r = subprocess.run([sys.executable, "-m", "pipeline", "data", "shard", str(src), out, "--shard-size-mb",
                        str(SHARD_MB), "--seed", "1", "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, **s3.env})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differs" not in r.stderr
    m = load_manifest(out)
    assert s3.counts()["refused"] >= 1
    assert f"wrote {len(m.shards)} of {len(m.shards)} shards" in r.stdout
