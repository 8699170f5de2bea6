"""``python -m pipeline data cache ls|prune`` on a cache the real ShardCache filled from the S3 test
server, and shards named by their content: two manifests that name the same shard bytes (``data
shard`` run again after an upgrade) share one file, fetched once; datasets listed with their roots,
shards and sizes, every byte counted once; a prune that keeps the roots named, removes the other
datasets and only the shards no remaining dataset names; a dataset that a live process uses is
refused; bad input is exit 2, naming it; cluster/README's commands as it prints them. Counts and
contents only; no Ray.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_pipeline
from shard_data import BUCKET

from pipeline.data.cache_folders import RECORD_NAME
from pipeline.data.cache_shards import SHARDS_FOLDER, shard_file
from pipeline.data.cache_slots import SLOTS_FOLDER
from pipeline.data.prep.cli import main
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_manifest import MANIFEST_NAME, load_manifest
from pipeline.store import locations

CACHED = {"a": [0, 1], "b": [0, 1, 2], "c": [0, 1]}  # the shards each dataset's cache is given


@pytest.fixture(scope="module")
def roots(s3, sharded, tmp_path_factory) -> dict[str, str]:
    """Three sharded datasets in the bucket: ``a``, the test shards; ``b``, the same shards with the
    manifest gzip'd again at another time (other manifest bytes, the same shards: as after an
    upgrade re-ran ``data shard``); ``c``, the same but shard 0 has 512 more bytes at its end (a
    tar's zero padding: its samples do not move), so its manifest names another shard 0."""
    import pyarrow.fs

    base = tmp_path_factory.mktemp("datasets")
    doc = json.loads(gzip.decompress((sharded / MANIFEST_NAME).read_bytes()))
    for name in ("b", "c"):
        shutil.copytree(sharded, base / name)
    (base / "b" / MANIFEST_NAME).write_bytes(gzip.compress(json.dumps(doc).encode(), mtime=1))
    first = base / "c" / doc["shards"][0]["name"]
    first.write_bytes(first.read_bytes() + bytes(512))
    doc["shards"][0]["size"] += 512
    doc["shards"][0]["sha256"] = hashlib.sha256(first.read_bytes()).hexdigest()
    (base / "c" / MANIFEST_NAME).write_bytes(gzip.compress(json.dumps(doc).encode(), mtime=2))
    out = {}
    for name, folder in (("a", sharded), ("b", base / "b"), ("c", base / "c")):
        fs, path = locations.filesystem(f"s3://{BUCKET}/{name}")
        pyarrow.fs.copy_files(str(folder), path, destination_filesystem=fs)
        out[name] = f"s3://{BUCKET}/{name}"
    return out


def folder_of(root: str) -> str:
    return load_manifest(root).digest[:16]


def fill(cache_dir: Path, root: str, shards: list[int]) -> None:
    """These shards of ``root`` fetched into ``cache_dir`` by the real cache."""
    cache = ShardCache(load_manifest(root), str(cache_dir), fetchers=1)
    try:
        for i in shards:
            assert cache.ensure(i) is not None
    finally:
        cache.close()


@pytest.fixture
def cache_dir(roots, tmp_path) -> Path:
    folder = tmp_path / "cache"
    for name, shards in CACHED.items():
        fill(folder, roots[name], shards)
    return folder


def shard_files(cache_dir: Path) -> set[str]:
    folder = cache_dir / SHARDS_FOLDER
    return {f.name for f in folder.iterdir() if f.name.endswith(".tar") and not f.name.startswith(".")}


def named(root: str, shards: list[int] | None = None) -> set[str]:
    """The cache's file names of these shards of ``root`` (all of them: None)."""
    m = load_manifest(root)
    return {shard_file(m.shards[i].sha256) for i in (range(len(m.shards)) if shards is None else shards)}


def files_bytes(cache_dir: Path, names: set[str]) -> int:
    return sum((cache_dir / SHARDS_FOLDER / n).stat().st_size for n in names)


def dataset_bytes(cache_dir: Path, root: str) -> int:
    """What ``ls`` says a dataset holds: its record and the cached shards it names."""
    record = (cache_dir / folder_of(root) / RECORD_NAME).stat().st_size
    return record + files_bytes(cache_dir, named(root) & shard_files(cache_dir))


def test_two_manifests_naming_the_same_shards_fetch_each_once_into_one_file(s3, roots, tmp_path):
    """``b``'s manifest differs from ``a``'s, its shards do not: ``b`` fetches nothing ``a``
    fetched, and the cache holds one file per shard; ``c``'s other shard 0 is a file of its own."""
    folder = tmp_path / "cache"
    s3.reset()
    fill(folder, roots["a"], [0, 1])
    assert s3.counts()["GET.tar"] == 2  # (the manifest is a GET too: .gz)
    s3.reset()
    fill(folder, roots["b"], [0, 1, 2])  # shards 0 and 1 are the files a fetched
    assert s3.counts()["GET.tar"] == 1
    assert shard_files(folder) == named(roots["a"], [0, 1, 2])
    s3.reset()
    fill(folder, roots["c"], [0, 1])
    assert s3.counts()["GET.tar"] == 1  # its shard 0 only
    assert shard_files(folder) == named(roots["a"], [0, 1, 2]) | named(roots["c"], [0])
    assert len(shard_files(folder)) == 4
    # A second handle of b (a worker restarted on the node) fetches nothing either.
    s3.reset()
    fill(folder, roots["b"], [0, 1, 2])
    assert s3.counts().get("GET.tar", 0) == 0


def test_ls_lists_each_cached_dataset_counting_each_byte_once(cache_dir, roots, capsys):
    old = cache_dir / "0123456789abcdef"  # a folder of the layout before content names: still listed
    old.mkdir()
    (old / "train-000000.tar").write_bytes(b"x" * 1000)
    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    folders = [p for p in cache_dir.iterdir() if re.fullmatch("[0-9a-f]{16}", p.name)]
    every_byte = sum(f.stat().st_size for d in folders for f in d.iterdir())  # records (and old tars)
    every_byte += files_bytes(cache_dir, shard_files(cache_dir))  # each shard once
    assert header == f"{cache_dir}: 4 cached datasets, {every_byte / 1e6:.2f} MB"
    assert len(lines) == 4
    by_folder = {line.split()[0]: line for line in lines}
    for name in CACHED:
        line = by_folder[folder_of(roots[name])]
        total = len(load_manifest(roots[name]).shards)
        cached = len(named(roots[name]) & shard_files(cache_dir))
        assert f"  {roots[name]} (sharded from " in line
        assert f"  {cached} of {total} shards  " in line
        assert f"  {dataset_bytes(cache_dir, roots[name]) / 1e6:.2f} MB (" in line  # some shared with others
        assert re.search(r"last used \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  not in use$", line), line
    # a and b name the same 3 cached shards; c names 2 of them (not shard 0) and its own shard 0.
    assert [len(named(roots[n]) & shard_files(cache_dir)) for n in "abc"] == [3, 3, 3]
    assert by_folder["0123456789abcdef"].startswith("0123456789abcdef  root not recorded  1 shards  0.00 MB")


def record_bytes(cache_dir: Path, root: str) -> int:
    return (cache_dir / folder_of(root) / RECORD_NAME).stat().st_size


def test_the_cluster_readme_commands_as_written(cache_dir, roots):
    """cluster/README's three commands, its folder and bucket mapped onto the test's."""
    readme = (Path(__file__).resolve().parents[1] / "cluster" / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python -m pipeline data cache ")]
    assert commands == [
        "python -m pipeline data cache ls --cache-dir /mnt/shard-cache",
        "python -m pipeline data cache prune --cache-dir /mnt/shard-cache --keep s3://my-bucket/imagenet-shards --dry-run",
        "python -m pipeline data cache prune --cache-dir /mnt/shard-cache --keep s3://my-bucket/imagenet-shards",
    ]
    kept, gone = folder_of(roots["a"]), folder_of(roots["b"])
    out = []
    for command in commands:
        words = command.replace("/mnt/shard-cache", str(cache_dir)).replace(
            "s3://my-bucket/imagenet-shards", roots["a"]
        )
        proc = run_pipeline(*words.split()[3:], timeout=120)
        assert proc.returncode == 0, proc.stderr
        out.append(proc.stdout)
    assert {line.split()[0] for line in out[0].splitlines()[1:]} == {kept, gone, folder_of(roots["c"])}
    assert f"would remove {gone}: {roots['b']}, 3 shards" in out[1]
    assert f"removed {gone}: {roots['b']}, 3 shards" in out[2]
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == sorted(
        [kept, SHARDS_FOLDER, SLOTS_FOLDER]
    )
    assert shard_files(cache_dir) == named(roots["a"], [0, 1, 2])


def test_prune_keeps_the_shards_a_kept_dataset_names(cache_dir, roots, capsys):
    """Keep c: a and b go; of the shards they fetched, those c names too stay (1 and 2), their
    shard 0 (not c's) goes. Each removed dataset says what it frees; the total counts each byte once."""
    kept = folder_of(roots["c"])
    shared = named(roots["a"], [1, 2])
    (cache_dir / "notes").mkdir()  # not named as the cache names a dataset: never listed or removed
    # a and b both name the shard 0 that goes: it is counted with the first removed (by folder name).
    first, second = sorted("ab", key=lambda n: folder_of(roots[n]))
    freed_first = record_bytes(cache_dir, roots[first]) + files_bytes(cache_dir, named(roots["a"], [0]))
    freed_second = record_bytes(cache_dir, roots[second])
    stays = files_bytes(cache_dir, shared)
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["c"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"kept {kept}: {roots['c']}, ")
    for name, freed, stay in (
        (first, freed_first, stays),
        (second, freed_second, stays),
    ):
        line = f"removed {folder_of(roots[name])}: {roots[name]}, 3 shards, {freed / 1e6:.2f} MB"
        assert f"{line} ({stay / 1e6:.2f} MB of shards a kept or running dataset names stay)" in out, out
    total = freed_first + freed_second
    assert out[-1] == f"{cache_dir}: removed 2 dataset(s), freed {total} bytes ({total / 1e6:.2f} MB)"
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == sorted(
        [kept, "notes", SHARDS_FOLDER, SLOTS_FOLDER]
    )
    assert shard_files(cache_dir) == shared | named(roots["c"], [0])
    # The pruned dataset's shard 0 is fetched again by the next job that reads it.
    fill(cache_dir, roots["a"], [0])
    assert named(roots["a"], [0]) <= shard_files(cache_dir)


def test_prune_dry_run_removes_nothing(cache_dir, roots, capsys):
    before = sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*"))
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("would remove ") for line in out.splitlines()) == 3
    every_shard = files_bytes(cache_dir, shard_files(cache_dir))
    records = sum(record_bytes(cache_dir, roots[n]) for n in CACHED)
    assert f"{cache_dir}: would remove 3 dataset(s), freed {every_shard + records} bytes" in out
    assert sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*")) == before
    # --keep given more than once keeps every root named.
    keep_all = ["--keep", roots["a"], "--keep", roots["b"], roots["c"]]
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), *keep_all, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("kept ") for line in out.splitlines()) == 3
    assert "would remove 0 dataset(s), freed 0 bytes" in out


def test_prune_refuses_a_dataset_a_running_job_holds(cache_dir, roots):
    """A live cache handle in this process holds dataset b; the prune, another process, sees it
    in the ledger and leaves it and the shards it names; once the handle is closed, the same
    command removes it."""
    busy = folder_of(roots["b"])
    holder = ShardCache(load_manifest(roots["b"]), str(cache_dir), fetchers=1)
    try:
        listed = run_pipeline("data", "cache", "ls", "--cache-dir", str(cache_dir), timeout=120)
        (line,) = [x for x in listed.stdout.splitlines() if x.startswith(busy)]
        assert line.endswith(f"in use by 1 process (pid {os.getpid()})")
        proc = run_pipeline(
            "data", "cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["c"], timeout=120
        )
        assert proc.returncode == 1, proc.stderr
        assert f"refused {busy}: {roots['b']} is in use by a running job (pid {os.getpid()})" in proc.stdout
        assert "removed 1 dataset(s)" in proc.stdout  # a, whose every cached shard b or c names
        assert shard_files(cache_dir) == named(roots["a"], [0, 1, 2]) | named(roots["c"], [0])
    finally:
        holder.close()
    proc = run_pipeline(
        "data", "cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["c"], timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"removed {busy}: {roots['b']}, 3 shards" in proc.stdout
    assert not (cache_dir / busy).exists()
    assert shard_files(cache_dir) == named(roots["c"], [0, 1, 2])


def test_bad_input_is_exit_2_naming_it(cache_dir, roots, tmp_path, capsys):
    missing = tmp_path / "no-cache"
    assert main(["cache", "ls", "--cache-dir", str(missing)]) == 2
    assert f"cache folder {missing} does not exist" in capsys.readouterr().err
    unknown = f"s3://{BUCKET}/not-a-dataset"
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["a"], unknown]) == 2
    assert f"--keep {unknown}: unknown dataset root" in capsys.readouterr().err
    assert (
        len([p for p in cache_dir.iterdir() if p.is_dir()]) == 5
    )  # nothing removed (3 datasets, shards, slots)
