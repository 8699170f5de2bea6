"""Reading the sharded layout: the epoch order over windows of shards, the per-node shard cache
behind an S3 server with latency (request counts, never times), every sample read exactly and
checked once, validation equal to the folder layout's, bad shards named, and training and
evaluation over the manifest.

The data and the S3 server are built by ``shard_data``; writing the shards is ``test_data_shards``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import torch
from shard_data import BUCKET, ROOT, small_config, upload_sharded

from pipeline.config import ConfigError, DataConfig
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_feed import open_sharded
from pipeline.data.shard_manifest import MANIFEST_NAME, ShardError, load_manifest
from pipeline.data.shard_reads import epoch_order
from pipeline.store import locations


@pytest.fixture(scope="module")
def s3_sharded(s3, sharded) -> str:
    return upload_sharded(sharded)


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
    cfg = small_config(s3_sharded, cache_dir)
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
    from pipeline.data.shard_reads import ShardReader

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
    reader = ShardReader(m, cache, "train", None)
    for i, got in zip(half, reader.read(half), strict=True):
        assert got.dtype == np.uint8 and got.tobytes() == (src / train.name[i]).read_bytes()
    assert len(crcs) == len(half)
    got = reader.read(ids)  # half of them seen before: only the others are checked
    assert len(crcs) == len(ids) and [g.tobytes() for g in got] == [
        (src / train.name[i]).read_bytes() for i in ids
    ]
    reader.read(ids)
    assert len(crcs) == len(ids)
    ShardReader(m, cache, "train", None).read(half)  # another process (a restarted worker) checks again
    assert len(crcs) == len(ids) + len(half)
    cache.close()


@pytest.mark.parametrize("mode", ["center", "tencrop", "multiscale"])
def test_sharded_val_matches_the_folder_layout(src, sharded, tmp_path, mode):
    from pipeline.data.source import ImageNetSource

    cfg = small_config(sharded, None, f"eval.mode={mode}", "eval.scales=[48,64]")
    folder = small_config(src, None, f"eval.mode={mode}", "eval.scales=[48,64]")
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


def test_training_images_in_eval_mode_equal_the_folder_layouts(src, sharded):
    """``eval.train_eval`` and ``deepen --inputs data`` on shards: every training image once over
    the ranks, each one the folder layout's tensor, and the same scores from the same network."""
    from pipeline.construction.deepen import _sample_batches
    from pipeline.data.source import ImageNetSource
    from pipeline.models import create_model
    from pipeline.train.evaluate import evaluate

    cfg, folder = (
        small_config(sharded, None, "eval.train_eval=true"),
        small_config(src, None, "eval.train_eval=true"),
    )
    m = load_manifest(sharded)
    theirs = ImageNetSource(folder.data).loaders(folder, rank=0, world_size=1, device=torch.device("cpu"),
                                                 num_threads=1, eval_batch=16).make_train_eval()  # fmt: skip
    by_name = {}
    for (x, y), names in zip(theirs.epoch(0), _batched(theirs.files, 16), strict=True):
        by_name.update(
            {os.path.relpath(n, src): (xi, yi) for n, xi, yi in zip(names, x, y.tolist(), strict=True)}
        )
    ours = []
    for rank in range(3):  # 120 images over 3 ranks, batches of 16: every rank's last batch padded
        data = open_sharded(cfg.data).loaders(cfg, rank=rank, world_size=3, device=torch.device("cpu"),
                                              num_threads=1, eval_batch=16)  # fmt: skip
        ours += [
            (xi, yi) for x, y in data.make_train_eval().epoch(0) for xi, yi in zip(x, y.tolist(), strict=True)
        ]
    assert len(ours) == len(by_name) == len(m.split("train"))
    for name, (x, y) in zip(m.split("train").name, ours, strict=True):
        assert y == by_name[name][1] and torch.equal(x, by_name[name][0]), name
    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=4)
    one = open_sharded(cfg.data).loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=1,
                                         eval_batch=16)  # fmt: skip
    a = evaluate(
        net, one.make_train_eval().epoch(0), mode="center", device=torch.device("cpu"), prefix="train_eval/"
    )
    b = evaluate(net, theirs.epoch(0), mode="center", device=torch.device("cpu"), prefix="train_eval/")
    counts = ("train_eval/images", "train_eval/top1_err", "train_eval/top5_err")
    assert [a[k] for k in counts] == [b[k] for k in counts]
    assert a["train_eval/loss"] == pytest.approx(b["train_eval/loss"], rel=1e-5)
    # `deepen --inputs data` compares on the first training and validation images (it crashed on shards).
    (what, train), (val_what, val) = _sample_batches(cfg, "data", 20, torch.device("cpu"))
    assert "training images" in what and "validation" in val_what
    assert sum(x.shape[0] for x in train) == sum(x.shape[0] for x in val) == 20


def _batched(items, n):
    return [items[i : i + n] for i in range(0, len(items), n)]


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
    cfg = small_config(s3_sharded, tmp_path / "c")
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
        assert not cache.cached_path(1).exists()  # never left in the cache
    finally:
        locations.write_bytes(f"{s3_sharded}/{m.shards[1].name}", (sharded / m.shards[1].name).read_bytes())


def test_a_bad_copy_met_by_every_rank_of_a_node_is_fetched_once(s3, s3_sharded, sharded, tmp_path):
    """Three ranks of a node hold the same cached shard open when a sample in it goes bad on the
    disk (same size and time: the `.ok` still vouches for it): each meets the bad sample, the
    first fetches the shard again, the others read that new copy."""
    cfg = small_config(s3_sharded, tmp_path / "c")
    m = open_sharded(cfg.data).manifest
    ranks = [ShardCache(m, cfg.data.cache_dir, 2) for _ in range(3)]
    t = m.split("train")
    i = int(np.flatnonzero(t.shard == 0)[0])
    sample = (int(t.offset[i]), int(t.size[i]), int(t.crc32[i]))
    want = (sharded / m.shards[0].name).read_bytes()[sample[0] : sample[0] + sample[1]]
    for cache in ranks:
        assert cache.read(0, *sample).tobytes() == want  # open (mapped), checked
    path = ranks[0].cached_path(0)
    st = path.stat()
    with open(path, "r+b") as f:  # the mappings see it: the pages are the file's
        f.seek(sample[0] + 100)
        f.write(bytes([want[100] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    s3.reset()
    for cache in ranks:
        assert cache.read(0, *sample).tobytes() == want
    assert s3.counts()["GET.tar"] == 1  # once for the node, not once per rank
    for cache in ranks:
        cache.close()


@pytest.mark.parametrize("mmap", [False, True])
def test_manifest_that_does_not_match_its_shards(sharded, tmp_path, mmap):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    doc = json.loads(gzip.decompress((broken / MANIFEST_NAME).read_bytes()))
    doc["splits"]["train"]["crc32"][0] ^= 1
    (broken / MANIFEST_NAME).write_bytes(gzip.compress(json.dumps(doc).encode()))
    cfg = small_config(broken, None, f"data.mmap={str(mmap).lower()}")
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

    # A disk too small for one window of shards: the default limit (its free space less headroom)
    # is refused at start, naming the setting and the number to set.
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ConfigError, match=r"data.cache_dir=.*leaves 0.00 GB.*set data.cache_limit_gb=.*room"):
        ShardCache(m, str(tmp_path / "small")).check_limit(window=4)


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


def test_train_and_eval_commands_report_a_bad_bucket_before_any_work(s3, s3_sharded, sharded, tmp_path):
    """A shard truncated in the bucket, and a bucket that cannot be reached: `train` (its Ray path:
    the check runs before Ray starts) and `eval` print the error naming the object and the fix and
    exit 2, with no traceback and nothing written."""
    from pipeline.config import load_config, to_dict
    from pipeline.models import build_model
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.setup import TrainingProgress

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    victim = broken / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[:-512])
    fs, path = locations.filesystem(f"s3://{BUCKET}/truncated")
    pyarrow.fs.copy_files(str(broken), path, destination_filesystem=fs)
    bad = f"s3://{BUCKET}/truncated"
    runs = tmp_path / "runs"
    checkpoint = tmp_path / "checkpoint"  # a real one: eval reads it before the data
    cfg = load_config("configs/demo.yaml", _tiny(s3_sharded, runs, "bad", tmp_path / "cache"))
    model = build_model(cfg.model)
    ckpt.save(checkpoint, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=None,
              progress=TrainingProgress(epoch=1, step=1), config=to_dict(cfg))  # fmt: skip
    unreachable = {**s3.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # port 9 (discard): nothing listens
    for root, env, says in ((bad, s3.env, "train-000002.tar: .* bytes, the manifest says .*truncated or replaced.*data shard"),
                            (s3_sharded, unreachable, "manifest.json.gz: cannot be read .*AWS_ENDPOINT_URL")):  # fmt: skip
        overrides = _tiny(root, runs, "bad", tmp_path / "cache")
        for command in (["train"], ["eval", "--checkpoint", str(checkpoint)]):
            r = _run(*command, "--config", "configs/demo.yaml", *overrides, env=env, timeout=300)
            assert r.returncode == 2 and re.search(says, r.stderr), (command, r.stderr[-2000:])
            assert "Traceback" not in r.stderr + r.stdout
    assert not runs.exists() and sorted(p.name for p in checkpoint.iterdir()) == ["state.pt"]
