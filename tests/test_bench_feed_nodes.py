"""``bench feed``'s cold start under faults: the fault spec, the server's total bandwidth cap and
faults set over HTTP, and K node processes reading epoch 1 through refusals, cuts and a storm
with the same bytes as a fault-free read, each fault counted once as a retry (counts, never times).

The shards and the S3 server are ``shard_data``'s; the bench is ``pipeline.bench.feed_nodes``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from argparse import Namespace

import pytest
from shard_data import upload_sharded

from pipeline.bench.common import BenchError
from pipeline.bench.feed_nodes import cold_start, parse_faults
from pipeline.bench.s3_latency import Faults, LatencyApp, LatencyS3
from pipeline.data.shard_manifest import load_manifest


def test_fault_spec_and_its_errors():
    assert parse_faults("503:10, cut:20,stall:50") == {
        "slowdown_every": 10,
        "cut_every": 20,
        "stall_every": 50,
    }
    for bad, says in (("503", "not KIND:N"), ("404:3", "not KIND:N"), ("cut:0", "not KIND:N"),
                      ("cut:x", "not KIND:N"), ("503:2,503:3", "503 given twice")):  # fmt: skip
        with pytest.raises(BenchError, match=says) as e:
            parse_faults(bad)
        assert repr(bad) in str(e.value)


def test_cut_that_falls_on_a_refused_get_goes_to_the_next():
    app = LatencyApp(None, 0, Faults(slowdown_every=2, cut_every=4))
    got = [app._fault("/b/k") for _ in range(8)]
    assert got == [None, "refused", None, "refused", "cut", "refused", None, "refused"]
    assert app.counts()["refused"] == 4 and app.counts()["cut"] == 1  # 1 in 2 and 1 in 4, over 8 (one due)


def test_faults_and_a_total_cap_set_over_http_in_a_server_of_its_own():
    with LatencyS3(latency_ms=0, own_process=True) as server:
        server.set_faults(Faults(slowdown_every=1, total_bandwidth_mbps=80.0, suffix=".bin"))
        with urllib.request.urlopen(f"{server.endpoint}/__latency/counts", timeout=10) as r:
            assert r.status == 200
        bucket = server.create_bucket("faults-http")
        assert bucket == "s3://faults-http"
        status = []
        for key in ("a.bin", "a.txt"):
            try:
                urllib.request.urlopen(f"{server.endpoint}/faults-http/{key}", timeout=10)
            except urllib.error.HTTPError as e:
                status.append(e.code)
        assert status == [503, 404]  # the .bin refused by the fault; the .txt reaches moto (no such key)
        assert server.counts()["refused"] == 1


@pytest.mark.slow  # two rounds of two node processes, retrying with the real backoff: 10-15 s here
def test_two_nodes_read_the_same_bytes_through_refusals_cuts_and_a_storm(s3, sharded, tmp_path):
    root = upload_sharded(sharded)
    m = load_manifest(root)
    train = len(m.split("train"))
    args = Namespace(batch_size=8, nodes=2, fetchers=2, shuffle_window=2, faults="503:5,cut:7", storm_s=0.5,
                     bandwidth_mbps=0.0, rounds=1)  # fmt: skip
    assert train % args.batch_size == 0  # every training shard is read in epoch 1
    c = cold_start(args, m, sharded, tmp_path, s3, ceiling=1000.0)
    assert c["faults"] == {"slowdown_every": 5, "cut_every": 7, "storm_s": 0.5, "storm_from": 5}
    for name in ("fault_free", "with_faults"):
        r = c[name]
        assert r["same_bytes_as_fault_free"], name
        nodes = r["per_node"]
        assert [n["images"] for n in nodes] == [train, train]
        # Each node fetched every training shard once, whole: cut bodies are not counted as fetched.
        assert all(n["bytes_fetched_over_dataset"] == 1.0 for n in nodes)
        assert sum(n["gets"] for n in nodes) == r["server"]["GET.tar"]
        # Every refusal and every cut is one retry, and only refusals count as throttled.
        assert sum(n["retries"] for n in nodes) == r["server"]["refused"] + r["server"]["cut"]
        assert sum(n["throttled"] for n in nodes) == r["server"]["refused"]
    assert c["fault_free"]["server"]["refused"] == c["fault_free"]["server"]["cut"] == 0
    faulty = c["with_faults"]["server"]
    assert faulty["cut"] > 0
    assert faulty["refused"] >= faulty["GET.tar"] // 5  # and every GET of the storm besides
