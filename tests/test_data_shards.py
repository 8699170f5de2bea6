"""``data shard``: WebDataset tars that match their manifest, byte-identical across runs, resumed
and repaired after an interruption, from a bucket into a bucket; and the S3 latency server the
sharded tests run against.

The S3 server is ``pipeline.bench.s3_latency.LatencyS3`` (moto, a wait before each GET, requests
counted by kind); the tests assert request counts, never times. Reading the shards is in
``test_data_shard_feed``; the data both use is built by ``shard_data``.

    .venv/bin/python -m pytest -q tests/test_data_shards.py tests/test_data_shard_feed.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from shard_data import ROOT, SHARD_MB, write_sharded

from pipeline.bench.s3_latency import LatencyS3, request_kind
from pipeline.data.prep.shard_writer import write_shards
from pipeline.data.shard_manifest import MANIFEST_NAME, load_manifest
from pipeline.store import locations


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


@pytest.mark.slow  # a whole command or several processes: the full suite's tier
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


def test_training_reads_the_manifest_without_the_writer():
    """The reader (``shard_manifest``) is what a worker needs; the ``data shard`` writer is never
    among the modules training imports, even inside functions (read from the syntax trees)."""
    from test_import_cycles import PACKAGE, imported_modules, module_files

    files = module_files(PACKAGE)
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    reached, todo = set(), ["pipeline.train.loop", "pipeline.data.shard_feed"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph.get(name, ())
    assert "pipeline.data.shard_manifest" in reached and "pipeline.data.prep.shard_writer" not in reached


def test_check_layout_of_a_sharded_root(src, tmp_path, capsys):
    """`data check-layout` (what `make train-imagenet` runs first) on a `data shard` output: the
    manifest read and every shard checked at its size; a missing shard is named."""
    from pipeline.data.prep import cli

    out = write_sharded(src, tmp_path / "sharded")
    assert cli.main(["check-layout", str(out)]) == 0
    said = capsys.readouterr().out
    assert "sharded (manifest" in said and "4 classes" in said and "120 train images in" in said
    victim = sorted(out.glob("train-*.tar"))[1]
    victim.unlink()
    assert cli.main(["check-layout", str(out)]) == 2
    assert f"{victim.name}: missing" in capsys.readouterr().err
