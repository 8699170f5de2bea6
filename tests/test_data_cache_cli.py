"""``python -m pipeline data cache ls|prune`` on a cache the real ShardCache filled from the S3 test
server: two datasets listed with their roots, shards and sizes; a prune that keeps the one named,
removes the other and says the bytes freed; a dataset that a live process uses is refused; bad
input is exit 2, naming it; cluster/README's commands as it prints them. Counts and contents only;
no Ray.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_pipeline
from shard_data import BUCKET

from pipeline.data.prep.cli import main
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_manifest import MANIFEST_NAME, load_manifest
from pipeline.store import locations

CACHED = {"a": 2, "b": 3}  # shards each dataset's cache is given


@pytest.fixture(scope="module")
def roots(s3, sharded, tmp_path_factory) -> dict[str, str]:
    """Two sharded datasets in the bucket: the test shards, and the same shards under another
    prefix with the manifest gzip'd again at another time (other bytes, so another digest: the
    cache keeps them in two folders, as two datasets)."""
    import pyarrow.fs

    other = tmp_path_factory.mktemp("other") / "b"
    shutil.copytree(sharded, other)
    raw = gzip.decompress((sharded / MANIFEST_NAME).read_bytes())
    (other / MANIFEST_NAME).write_bytes(gzip.compress(raw, mtime=1))
    out = {}
    for name, folder in (("a", sharded), ("b", other)):
        fs, path = locations.filesystem(f"s3://{BUCKET}/{name}")
        pyarrow.fs.copy_files(str(folder), path, destination_filesystem=fs)
        out[name] = f"s3://{BUCKET}/{name}"
    return out


def folder_of(root: str) -> str:
    return load_manifest(root).digest[:16]


def fill(cache_dir: Path, root: str, count: int) -> None:
    """The first ``count`` shards of ``root`` fetched into ``cache_dir`` by the real cache."""
    cache = ShardCache(load_manifest(root), str(cache_dir), fetchers=1)
    try:
        for i in range(count):
            assert cache.ensure(i) is not None
    finally:
        cache.close()


@pytest.fixture
def cache_dir(roots, tmp_path) -> Path:
    folder = tmp_path / "cache"
    for name, count in CACHED.items():
        fill(folder, roots[name], count)
    return folder


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def shards_in(path: Path) -> set[str]:
    return {f.name for f in path.iterdir() if f.name.endswith(".tar") and not f.name.startswith(".")}


def test_ls_lists_each_cached_dataset(cache_dir, roots, capsys):
    (cache_dir / "0123456789abcdef").mkdir()  # a folder from before dataset.json: still listed
    (cache_dir / "0123456789abcdef" / "train-000000.tar").write_bytes(b"x" * 1000)
    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.startswith(f"{cache_dir}: 3 cached datasets, ")
    assert len(lines) == 3
    by_folder = {line.split()[0]: line for line in lines}
    for name, count in CACHED.items():
        folder = folder_of(roots[name])
        line = by_folder[folder]
        total = len(load_manifest(roots[name]).shards)
        assert f"  {roots[name]} (sharded from " in line
        assert f"  {count} of {total} shards  " in line
        assert f"  {folder_bytes(cache_dir / folder) / 1e6:.2f} MB  " in line
        assert re.search(r"last used \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  not in use$", line), line
    assert by_folder["0123456789abcdef"].startswith("0123456789abcdef  root not recorded  1 shards  0.00 MB")


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
    assert {line.split()[0] for line in out[0].splitlines()[1:]} == {kept, gone}
    assert f"would remove {gone}: {roots['b']}, {CACHED['b']} shards" in out[1]
    assert f"removed {gone}: {roots['b']}, {CACHED['b']} shards" in out[2]
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [kept]


def test_prune_keeps_the_named_root_and_removes_the_rest(cache_dir, roots, capsys):
    kept, gone = folder_of(roots["a"]), folder_of(roots["b"])
    kept_shards, freed = shards_in(cache_dir / kept), folder_bytes(cache_dir / gone)
    (cache_dir / "notes").mkdir()  # not named as the cache names a dataset: never listed or removed
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["a"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"kept {kept}: {roots['a']}, ")
    assert out[1] == f"removed {gone}: {roots['b']}, {CACHED['b']} shards, {freed / 1e6:.2f} MB"
    assert out[-1] == f"{cache_dir}: removed 1 dataset(s), freed {freed} bytes ({freed / 1e6:.2f} MB)"
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == [kept, "notes"]  # no hidden one left
    assert shards_in(cache_dir / kept) == kept_shards and len(kept_shards) == CACHED["a"]
    # The pruned dataset is fetched again by the next job that reads it.
    fill(cache_dir, roots["b"], 1)
    assert len(shards_in(cache_dir / gone)) == 1


def test_prune_dry_run_removes_nothing(cache_dir, roots, capsys):
    before = {p.name: shards_in(p) for p in cache_dir.iterdir() if p.is_dir()}
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("would remove ") for line in out.splitlines()) == 2
    assert f"{cache_dir}: would remove 2 dataset(s), freed " in out
    assert {p.name: shards_in(p) for p in cache_dir.iterdir() if p.is_dir()} == before
    # --keep given twice keeps both roots.
    keep_both = ["--keep", roots["a"], "--keep", roots["b"]]
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), *keep_both, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("kept ") for line in out.splitlines()) == 2
    assert "would remove 0 dataset(s), freed 0 bytes" in out


def test_prune_refuses_a_dataset_a_running_job_holds(cache_dir, roots):
    """A live cache handle in this process holds dataset b; the prune, another process, sees it
    in the ledger and leaves it; once the handle is closed, the same command removes it."""
    busy = folder_of(roots["b"])
    holder = ShardCache(load_manifest(roots["b"]), str(cache_dir), fetchers=1)
    try:
        listed = run_pipeline("data", "cache", "ls", "--cache-dir", str(cache_dir), timeout=120)
        (line,) = [x for x in listed.stdout.splitlines() if x.startswith(busy)]
        assert line.endswith(f"in use by 1 process (pid {os.getpid()})")
        proc = run_pipeline(
            "data", "cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["a"], timeout=120
        )
        assert proc.returncode == 1, proc.stderr
        assert f"refused {busy}: {roots['b']} is in use by a running job (pid {os.getpid()})" in proc.stdout
        assert "removed 0 dataset(s), freed 0 bytes" in proc.stdout
        assert len(shards_in(cache_dir / busy)) == CACHED["b"]
    finally:
        holder.close()
    proc = run_pipeline(
        "data", "cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["a"], timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"removed {busy}: {roots['b']}, {CACHED['b']} shards" in proc.stdout
    assert not (cache_dir / busy).exists()


def test_bad_input_is_exit_2_naming_it(cache_dir, roots, tmp_path, capsys):
    missing = tmp_path / "no-cache"
    assert main(["cache", "ls", "--cache-dir", str(missing)]) == 2
    assert f"cache folder {missing} does not exist" in capsys.readouterr().err
    unknown = f"s3://{BUCKET}/not-a-dataset"
    assert main(["cache", "prune", "--cache-dir", str(cache_dir), "--keep", roots["a"], unknown]) == 2
    assert f"--keep {unknown}: unknown dataset root" in capsys.readouterr().err
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2  # nothing removed
