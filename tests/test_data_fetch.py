"""The S3 test server's faults (``pipeline.bench.s3_latency.Faults``), each counted."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from http.client import IncompleteRead

import pytest
from shard_data import BUCKET

from pipeline.bench.s3_latency import Faults
from pipeline.store import locations

PART = 64 * 1024
BLOB = os.urandom(10 * PART + 1234)
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
