"""The sharded layout: ``data shard``, the per-node shard cache behind an S3 server with latency,
training and eval over the manifest, and bad input.

The S3 server is ``pipeline.bench.s3_latency.LatencyS3`` (moto, a wait before each GET, requests
counted by kind); the tests assert request counts, never times.

    .venv/bin/python -m pytest -q tests/test_data_shards.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bench.s3_latency import LatencyS3, request_kind
from pipeline.config import DataConfig, load_config
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_feed import epoch_order, open_sharded
from pipeline.data.shards import MANIFEST_NAME, ShardError, load_manifest, write_shards
from pipeline.data.synth import write_synthetic_imagenet
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


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "src"
    write_synthetic_imagenet(root, classes=4, train_per_class=30, val_per_class=6, seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def sharded(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    write_shards(str(src), str(out), shard_size_mb=SHARD_MB, seed=1, workers=2, progress=None)
    return out


@pytest.fixture(scope="module")
def s3():
    """The latency server (5 ms per GET keeps the tests quick) and the environment pointing at it."""
    with LatencyS3(latency_ms=5) as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        server.create_bucket("shard-test")
        yield server


@pytest.fixture(scope="module")
def s3_sharded(s3, sharded) -> str:
    """The local shards uploaded as they are to s3://shard-test/ds."""
    import pyarrow.fs

    fs, path = locations.filesystem("s3://shard-test/ds")
    pyarrow.fs.copy_files(str(sharded), path, destination_filesystem=fs)
    return "s3://shard-test/ds"


def _cfg(root, cache: Path | None = None, *more: str):
    extra = [f"data.cache_dir={cache}"] if cache else []
    return load_config(None, [f"data.root={root}", *SMALL, "optim.batch_size=16", *extra, *more])


def _files(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


# ---------------------------------------------------------------- the latency server


def test_request_kinds():
    assert request_kind("GET", "/bucket/key/x.tar", "") == "GET"
    assert request_kind("GET", "/bucket", "list-type=2") == "LIST"
    assert request_kind("HEAD", "/bucket/key", "") == "HEAD"
    assert request_kind("PUT", "/bucket/key", "") == "PUT"
    assert request_kind("PUT", "/bucket", "") == "OTHER"


def test_latency_server_counts_gets_and_bytes(s3):
    locations.write_bytes("s3://shard-test/counted/a.bin", b"x" * 1000)
    s3.reset()
    assert locations.read_bytes("s3://shard-test/counted/a.bin") == b"x" * 1000
    counts = s3.counts()
    assert counts["GET"] >= 1 and counts["GET.bin"] == counts["GET"] and counts["get_bytes"] == 1000
    assert counts["PUT"] == 0


def test_latency_server_in_its_own_process_counts_over_http(monkeypatch):
    with LatencyS3(latency_ms=1, own_process=True) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        server.create_bucket("own-process")
        locations.write_bytes("s3://own-process/a.tar", b"y" * 300)
        server.reset()
        assert locations.read_bytes("s3://own-process/a.tar") == b"y" * 300
        counts = server.counts()
        assert counts["GET.tar"] == counts["GET"] >= 1 and counts["get_bytes"] == 300


# ---------------------------------------------------------------- data shard


def test_shards_are_webdataset_tars_matching_the_manifest(src, sharded):
    m = load_manifest(sharded)
    train, val = m.split("train"), m.split("val")
    assert len(train) == 120 and len(val) == 24 and m.classes == tuple(f"n{i:08d}" for i in range(4))
    assert len(m.shards) > 20
    seen = set()
    for k, shard in enumerate(m.shards):
        path = sharded / shard.name
        data = path.read_bytes()
        assert len(data) == shard.size and hashlib.sha256(data).hexdigest() == shard.sha256
        members = _files(path)
        split = m.split(shard.split)
        ids = np.flatnonzero(split.shard == k)
        assert sorted(members) == sorted([f"{i:08d}.jpg" for i in ids] + [f"{i:08d}.cls" for i in ids])
        for i in ids:
            jpg = members[f"{i:08d}.jpg"]
            assert jpg == (src / split.name[i]).read_bytes()  # the source bytes, untouched
            assert data[split.offset[i] : split.offset[i] + split.size[i]] == jpg  # byte-exact offsets
            assert int(members[f"{i:08d}.cls"]) == split.label[i]
            seen.add(split.name[i])
    assert len(seen) == 144
    # Training samples are shuffled across shards; validation keeps the folder order.
    assert list(train.label) != sorted(train.label)
    assert list(val.name) == sorted(val.name)


def test_shards_are_byte_identical_across_runs(src, sharded, tmp_path):
    again = tmp_path / "again"
    write_shards(str(src), str(again), shard_size_mb=SHARD_MB, seed=1, workers=1, progress=None)
    for tar in sorted(sharded.glob("*.tar")):
        assert (again / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert (again / MANIFEST_NAME).read_bytes() == (sharded / MANIFEST_NAME).read_bytes()


def test_dali_webdataset_reader_reads_the_shards(sharded):
    from nvidia.dali import fn, pipeline_def

    m = load_manifest(sharded)
    tars = [str(sharded / s.name) for s in m.shards if s.split == "val"]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, ext=["jpg", "cls"], missing_component_behavior="error")
        return fn.decoders.image(jpg), cls

    p = pipe()
    p.build()
    images, cls = p.run()
    assert len(images) == 4
    labels = [int(bytes(np.array(cls[i])).decode()) for i in range(4)]
    assert labels == [int(x) for x in m.split("val").label[:4]]


def test_shard_command_resumes_and_repairs(src, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "data",
        "shard",
        str(src),
        str(out),
        "--shard-size-mb",
        str(SHARD_MB),
    ]
    first = subprocess.run([*cmd, "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "img/s" in first.stderr and "ETA" in first.stderr  # progress
    manifest = (out / MANIFEST_NAME).read_bytes()
    shards = sorted(out.glob("*.tar"))
    # An interruption: one shard and its record gone; one truncated; one altered in place.
    (out / ".parts" / (shards[0].name + ".json")).unlink()
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    data = bytearray(shards[2].read_bytes())
    data[700] ^= 0xFF
    shards[2].write_bytes(bytes(data))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"wrote 3 of {len(shards)} shards" in again.stdout
    assert (out / MANIFEST_NAME).read_bytes() == manifest
    quiet = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "present and intact" in quiet.stdout
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.is_file()]  # no temporary files


def test_shard_from_a_bucket_into_a_bucket(s3, src, sharded):
    """SRC and OUT both s3://: the same shards, byte for byte, as from the local tree."""
    import pyarrow.fs

    fs, path = locations.filesystem("s3://shard-test/src")
    pyarrow.fs.copy_files(str(src), path, destination_filesystem=fs)
    summary = write_shards("s3://shard-test/src", "s3://shard-test/from-s3", shard_size_mb=SHARD_MB, seed=1,
                           workers=2, progress=None)  # fmt: skip
    m = load_manifest("s3://shard-test/from-s3")
    assert summary["written"] == len(m.shards) == len(load_manifest(sharded).shards)
    for shard in m.shards:
        assert (
            locations.read_bytes(f"s3://shard-test/from-s3/{shard.name}")
            == (sharded / shard.name).read_bytes()
        )


def test_shard_command_bad_input(src, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "data", "shard", str(tmp_path / "nowhere"), str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "nowhere" in r.stderr
    out = tmp_path / "other"
    write_shards(str(src), str(out), shard_size_mb=SHARD_MB, seed=0, workers=1, progress=None)
    with pytest.raises(FileExistsError, match="another source or settings.*--force"):
        write_shards(str(src), str(out), shard_size_mb=SHARD_MB, seed=5, workers=1, progress=None)
    with pytest.raises(ValueError, match="inside SRC"):
        write_shards(str(src), str(src / "shards"), workers=1, progress=None)


# ---------------------------------------------------------------- the order


def test_epoch_order_is_a_windowed_permutation(sharded):
    m = load_manifest(sharded)
    n = len(m.split("train"))
    a = epoch_order(m, seed=3, epoch=0, window=4)
    assert sorted(a.tolist()) == list(range(n))
    assert np.array_equal(a, epoch_order(m, seed=3, epoch=0, window=4))
    assert not np.array_equal(a, epoch_order(m, seed=3, epoch=1, window=4))
    # The first quarter of the epoch draws from few shards (a window), the full shuffle from most.
    first = m.split("train").shard[a[: n // 8]]
    full = m.split("train").shard[epoch_order(m, seed=3, epoch=0, window=0)[: n // 8]]
    assert len(set(first.tolist())) <= 8 < len(set(full.tolist()))


# ---------------------------------------------------------------- the cache over S3


def _drain(loader, epoch):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch)]


def test_cache_fetches_each_shard_once_per_node_and_nothing_after(s3, s3_sharded, tmp_path):
    cache_dir = tmp_path / "node-cache"
    cfg = _cfg(s3_sharded, cache_dir)
    source = open_sharded(cfg.data)
    m = source.manifest
    train_shards = len(m.shard_ids("train"))
    s3.reset()
    # Two ranks of one node, each its own process-level cache handle over the same folder.
    ranks = [
        source.loaders(cfg, rank=r, world_size=2, device=torch.device("cpu"), num_threads=1, eval_batch=8)
        for r in range(2)
    ]
    for data in ranks:
        _drain(data.train, 0)
    epoch1 = s3.counts()
    per_shard = len(m.split("train")) / train_shards
    assert epoch1["GET"] == train_shards  # each training shard once for the node: whole-object GETs
    assert epoch1["GET"] / len(m.split("train")) <= 1.1 / per_shard
    assert epoch1["get_bytes"] == m.bytes_of("train")
    s3.reset()
    for data in ranks:
        _drain(data.train, 1)
    assert s3.counts()["GET"] == 0  # epoch 2: no data GETs at all
    # A worker restarted on the node reuses the cache: its first epoch makes no GET either.
    again = source.loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=1, eval_batch=8)
    _drain(again.train, 0)
    assert s3.counts()["GET"] == 0
    # Validation: every image once over the ranks, each val shard fetched once.
    labels = []
    for data in ranks:
        labels += [y for _, ys in data.make_val("center").epoch(0) for y in ys.tolist()]
    assert sorted(labels) == sorted(m.split("val").label.tolist())
    assert s3.counts()["GET"] == len(m.shard_ids("val"))


@pytest.mark.parametrize("where", ["local plain reads", "local mapped", "cached from s3"])
def test_each_sample_is_read_exactly_and_checked_once_per_process(
    where, src, sharded, request, tmp_path, monkeypatch
):
    """The feed's bytes are the source JPEGs from every kind of shard file; each sample's CRC-32
    is computed the first time a process reads it, and not again from the same open file."""
    import zlib

    from pipeline.data import shard_cache
    from pipeline.data.shard_feed import _Reader

    root = request.getfixturevalue("s3_sharded") if where == "cached from s3" else str(sharded)
    m = load_manifest(root)
    cache = ShardCache(m, str(tmp_path / "cache"), 2, mmap=where == "local mapped")
    assert cache.mapped == (where != "local plain reads")  # the node's cache is always mapped
    crcs = []
    crc32 = zlib.crc32
    monkeypatch.setattr(shard_cache.zlib, "crc32", lambda data: crcs.append(1) or crc32(data))
    train = m.split("train")
    ids = np.arange(len(train))[::-1]
    half = ids[: len(ids) // 2]
    reader = _Reader(m, cache, "train", None)
    for i, got in zip(half, reader.read(half), strict=True):
        assert got.dtype == np.uint8 and got.tobytes() == (src / train.name[i]).read_bytes()
    assert len(crcs) == len(half)
    got = reader.read(ids)  # half of them seen before: only the others are checked
    assert len(crcs) == len(ids) and [g.tobytes() for g in got] == [
        (src / train.name[i]).read_bytes() for i in ids
    ]
    reader.read(ids)
    assert len(crcs) == len(ids)
    _Reader(m, cache, "train", None).read(half)  # another process (a restarted worker) checks again
    assert len(crcs) == len(ids) + len(half)
    cache.close()


@pytest.mark.parametrize("mode", ["center", "tencrop", "multiscale"])
def test_sharded_val_matches_the_folder_layout(src, sharded, tmp_path, mode):
    from pipeline.data.source import ImageNetSource

    cfg = _cfg(sharded, None, f"eval.mode={mode}", "eval.scales=[48,64]")
    folder = _cfg(src, None, f"eval.mode={mode}", "eval.scales=[48,64]")
    for world in (1, 3):
        ours, theirs = [], []
        for rank in range(world):
            a = open_sharded(cfg.data).loaders(cfg, rank=rank, world_size=world, device=torch.device("cpu"),
                                               num_threads=1, eval_batch=5).make_val(mode)  # fmt: skip
            b = ImageNetSource(folder.data).loaders(folder, rank=rank, world_size=world, device=torch.device("cpu"),
                                                   num_threads=1, eval_batch=5).make_val(mode)  # fmt: skip
            ours += list(a.epoch(0))
            theirs += list(b.epoch(0))
        assert len(ours) == len(theirs)
        for (xa, ya), (xb, yb) in zip(ours, theirs, strict=True):
            assert torch.equal(ya, yb)
            if mode == "multiscale":
                for sa, sb in zip(xa, xb, strict=True):
                    for ta, tb in zip(sa, sb, strict=True):
                        assert torch.equal(ta, tb)
            else:
                assert torch.equal(xa, xb)


# ---------------------------------------------------------------- bad input


def test_missing_or_truncated_shard_is_named_at_open(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    name = sorted(broken.glob("train-*.tar"))[3]
    name.write_bytes(name.read_bytes()[:-512])
    with pytest.raises(ShardError, match=rf"{name.name}: .*truncated.*data shard"):
        open_sharded(DataConfig(root=str(broken)))
    name.unlink()
    with pytest.raises(ShardError, match=rf"{name.name}: missing.*data shard"):
        open_sharded(DataConfig(root=str(broken)))


def test_altered_shard_on_s3_is_fetched_again_then_named(s3, s3_sharded, sharded, tmp_path):
    cfg = _cfg(s3_sharded, tmp_path / "c")
    source = open_sharded(cfg.data)
    m = source.manifest
    cache = ShardCache(m, cfg.data.cache_dir, 2)
    # A cached copy damaged on the node's disk (same size): the sample's CRC fails, the shard is
    # fetched again, and the read succeeds.
    path = cache.ensure(0)
    data = bytearray(path.read_bytes())
    offset = int(m.split("train").offset[0])
    data[offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    s3.reset()
    t = m.split("train")
    assert (
        cache.read(0, int(t.offset[0]), int(t.size[0]), int(t.crc32[0])).tobytes()
        == (sharded / m.shards[0].name).read_bytes()[offset : offset + int(t.size[0])]
    )
    assert s3.counts()["GET"] == 1
    # The bucket's shard altered (same size): its checksum fails twice; the error names it.
    bad = bytearray((sharded / m.shards[1].name).read_bytes())
    bad[600] ^= 0xFF
    locations.write_bytes(f"{s3_sharded}/{m.shards[1].name}", bytes(bad))
    try:
        with pytest.raises(ShardError, match=rf"{m.shards[1].name}: .*SHA-256.*data shard"):
            cache.ensure(1)
        assert not (cache.dir / m.shards[1].name).exists()  # never left in the cache
    finally:
        locations.write_bytes(f"{s3_sharded}/{m.shards[1].name}", (sharded / m.shards[1].name).read_bytes())


@pytest.mark.parametrize("mmap", [False, True])
def test_manifest_that_does_not_match_its_shards(sharded, tmp_path, mmap):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    doc = json.loads(gzip.decompress((broken / MANIFEST_NAME).read_bytes()))
    doc["splits"]["train"]["crc32"][0] ^= 1
    (broken / MANIFEST_NAME).write_bytes(gzip.compress(json.dumps(doc).encode()))
    cfg = _cfg(broken, None, f"data.mmap={str(mmap).lower()}")
    source = open_sharded(cfg.data)
    data = source.loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=1, eval_batch=8)
    with pytest.raises(ShardError, match=r"train-000000\.tar: the sample at byte .*CRC-32.*data shard"):
        for _ in data.train.epoch(0):
            pass
    (broken / MANIFEST_NAME).write_bytes(b"not gzip")
    with pytest.raises(ShardError, match=rf"{MANIFEST_NAME}: not a readable shard manifest"):
        load_manifest(broken)


def test_cache_folder_not_writable_or_too_small(s3, s3_sharded, tmp_path, monkeypatch):
    m = load_manifest(s3_sharded)
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(ShardError, match=rf"data.cache_dir={blocked}: cannot write"):
        ShardCache(m, str(blocked))
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ShardError, match=r"data.cache_dir=.*GB free.*need .*point data.cache_dir"):
        ShardCache(m, str(tmp_path / "small")).check_capacity(["train", "val"])


# ---------------------------------------------------------------- training over the manifest


def _run(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})  # fmt: skip


def _tiny(root: str, runs: Path, name: str, cache: Path) -> list[str]:
    from conftest import tiny_overrides

    keep = [o for o in tiny_overrides(Path("x"), runs, name) if not o.startswith("data.root=")]
    return [*keep, f"data.root={root}", f"data.cache_dir={cache}", "schedule.epochs=2"]


@pytest.mark.slow
def test_train_and_every_eval_mode_from_s3_on_one_process(s3, s3_sharded, tmp_path):
    """`train data.root=s3://.../shards` (recognised by its manifest), then `eval` in each mode."""
    overrides = _tiny(s3_sharded, tmp_path / "runs", "one", tmp_path / "cache")
    s3.reset()
    r = _run(
        "train", "--config", "configs/demo.yaml", "--no-ray", *overrides, "cluster.num_workers=1", env=s3.env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = load_manifest(s3_sharded)
    assert s3.counts()["GET.tar"] == len(m.shards)  # every shard once
    summary = json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())
    assert summary["val_images"] == len(m.split("val"))
    for mode, extra in (("center", []), ("tencrop", []), ("multiscale", ["eval.scales=[48,56]"])):
        out = tmp_path / f"{mode}.json"
        e = _run("eval", "--config", "configs/demo.yaml", "--no-ray", "--checkpoint", summary["checkpoint"], "--out", str(out), *overrides,
                 "cluster.num_workers=1", f"eval.mode={mode}", *extra, env=s3.env)  # fmt: skip
        assert e.returncode == 0, e.stderr[-3000:]
        assert json.loads(out.read_text())["images"] == len(m.split("val")), mode


@pytest.mark.slow
@pytest.mark.ray
def test_train_from_s3_under_ray_with_two_workers(s3, s3_sharded, tmp_path):
    overrides = _tiny(s3_sharded, tmp_path / "runs", "ray", tmp_path / "cache")
    s3.reset()
    r = _run("train", "--config", "configs/demo.yaml", *overrides, "cluster.num_workers=2", env=s3.env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = load_manifest(s3_sharded)
    summary = json.loads((tmp_path / "runs" / "ray" / "summary.json").read_text())
    assert summary["val_images"] == len(m.split("val"))
    # Two ranks on one node: each shard fetched once for the node (plus manifest reads).
    assert s3.counts()["GET.tar"] == len(m.shards)
