"""The sharded layout's test data, built the same way for ``test_data_shards`` (writing shards)
and ``test_data_shard_feed`` (reading them): a small synthetic ImageNet, its shards, the S3
latency server, and the shards uploaded to it. Each module wraps these in its own fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.bench.s3_latency import LatencyS3
from pipeline.config import load_config
from pipeline.data.prep.shard_writer import write_shards
from pipeline.data.prep.synth import write_synthetic_imagenet
from pipeline.store import locations

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.crop_size=48",
    "data.scale_min=52",
    "data.scale_max=64",
    "data.val_resize=52",
    "model.num_classes=4",
]
SHARD_MB = 0.2  # ~3 of the synthetic 60 KB JPEGs per shard: many shards from a few hundred images
BUCKET = "shard-test"


def write_source(root: Path) -> Path:
    """A synthetic ImageNet of 4 classes: 120 training and 24 validation JPEGs."""
    write_synthetic_imagenet(root, classes=4, train_per_class=30, val_per_class=6, seed=0, workers=1)
    return root


def write_sharded(src: Path, out: Path) -> Path:
    """``src`` as shards of ``SHARD_MB`` in ``out``."""
    write_shards(str(src), str(out), shard_size_mb=SHARD_MB, seed=1, workers=2, progress=None)
    return out


@contextmanager
def latency_s3() -> Iterator[LatencyS3]:
    """The latency server (5 ms per GET keeps the tests quick) with ``BUCKET``, and the
    environment pointing at it while it runs."""
    with LatencyS3(latency_ms=5) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        server.create_bucket(BUCKET)
        yield server


def upload_sharded(sharded: Path) -> str:
    """The local shards uploaded as they are to s3://shard-test/ds."""
    import pyarrow.fs

    fs, path = locations.filesystem(f"s3://{BUCKET}/ds")
    pyarrow.fs.copy_files(str(sharded), path, destination_filesystem=fs)
    return f"s3://{BUCKET}/ds"


def small_config(root, cache: Path | None = None, *more: str):
    """The resolved config for small crops over ``root``, with a shard cache in ``cache`` if given."""
    extra = [f"data.cache_dir={cache}"] if cache else []
    return load_config(None, [f"data.root={root}", *SMALL, "optim.batch_size=16", *extra, *more])
