"""The dataset in object storage: ``data index``, ``check-layout`` and DALI reading ``s3://``.

A moto S3 server on 127.0.0.1 (a random port) stands in for the bucket; every client finds
it through ``AWS_ENDPOINT_URL``, as users point the pipeline at MinIO or Ceph.

    .venv/bin/python -m pytest -q tests/test_data_remote.py
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import moto_s3

from pipeline.data.layout import INDEX_NAME, DataLayoutError, scan_imagenet, write_index
from pipeline.data.prep import cli
from pipeline.data.prep.synth import write_synthetic_imagenet
from pipeline.store import locations

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "data-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server and the AWS environment that points every client at it."""
    with moto_s3(BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote") / "data"
    write_synthetic_imagenet(root, classes=3, train_per_class=4, val_per_class=2, seed=0, workers=1)
    return root


def _upload(local: Path, uri: str) -> str:
    import pyarrow.fs

    fs, path = locations.filesystem(uri)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)
    return uri


def _put(uri: str, data: bytes = b"") -> None:
    locations.write_bytes(uri, data)


def _delete(uri: str) -> None:
    fs, path = locations.filesystem(uri)
    fs.delete_file(path)


def _relative(index, root: str) -> tuple:
    def strip(files):
        return tuple(f[len(root) :] for f in files)

    return (
        index.classes,
        strip(index.train_files),
        index.train_labels,
        strip(index.val_files),
        index.val_labels,
    )


# ---------------------------------------------------------------- index in a bucket


def test_index_written_to_and_read_from_a_bucket(s3, local_data, monkeypatch, capsys):
    uri = _upload(local_data, f"s3://{BUCKET}/written")
    listed = scan_imagenet(uri)
    assert listed.index_file is None
    assert listed.train_files[0] == f"{uri}/train/n00000000/n00000000_000000.JPEG"
    assert _relative(listed, uri) == _relative(scan_imagenet(local_data), str(local_data))

    assert cli.main(["index", uri + "/"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {uri}/{INDEX_NAME}" in out and "3 classes, 12 train images, 6 val images" in out
    doc = json.loads(gzip.decompress(locations.read_bytes(f"{uri}/{INDEX_NAME}")))
    assert doc["classes"] == list(listed.classes)
    assert doc["train"]["n00000001"] == [Path(f).name for f in listed.train_files[4:8]]

    # With the index, no recursive listing of the bucket happens at all.
    def no_walk(location):
        raise AssertionError(f"listed {location} recursively although an index exists")

    monkeypatch.setattr(locations, "list_tree", no_walk)
    indexed = scan_imagenet(uri)
    assert indexed == listed and indexed.index_file == f"{uri}/{INDEX_NAME}"


def test_check_layout_on_a_bucket(s3, local_data, capsys):
    uri = _upload(local_data, f"s3://{BUCKET}/checked")
    assert cli.main(["check-layout", uri]) == 0
    out = capsys.readouterr().out
    assert f"{uri}: 3 classes, 12 train images, 6 val images" in out and "no index at" in out
    write_index(uri)
    assert cli.main(["check-layout", uri]) == 0
    assert "up to date" in capsys.readouterr().out

    assert cli.main(["check-layout", f"s3://{BUCKET}/nothing-here"]) == 2
    assert "dataset root does not exist" in capsys.readouterr().err

    # The flat val/ of the ImageNet download, in a bucket.
    flat = f"s3://{BUCKET}/flat"
    _put(f"{flat}/train/a/a_0.JPEG", (local_data / "train/n00000000/n00000000_000000.JPEG").read_bytes())
    _put(f"{flat}/val/ILSVRC2012_val_00000001.JPEG", b"x")
    assert cli.main(["check-layout", flat]) == 2
    assert "prepare-val" in capsys.readouterr().err


def test_unreachable_store_names_the_uri_and_the_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(DataLayoutError, match=r"s3://data-test/any.*AWS_ENDPOINT_URL"):
        scan_imagenet(f"s3://{BUCKET}/any")


@pytest.mark.parametrize("change", ["new class", "missing image", "added image", "corrupt"])
def test_stale_index_is_refused_with_the_fix(s3, local_data, change, capsys):
    uri = _upload(local_data, f"s3://{BUCKET}/stale-{change.replace(' ', '-')}")
    path, _, _ = write_index(uri)
    jpeg = (local_data / "train/n00000000/n00000000_000000.JPEG").read_bytes()
    if change == "new class":
        _put(f"{uri}/train/n00000099/x.JPEG", jpeg)
        where = f"class folders of {uri}/train: 1 not in the index (e.g. n00000099)"
    elif change == "missing image":
        _delete(f"{uri}/val/n00000002/val_n00000002_000001.JPEG")
        where = f"images of {uri}/val/n00000002: 1 in the index but missing (e.g. val_n00000002_000001.JPEG)"
    elif change == "added image":
        _put(f"{uri}/train/n00000001/extra.JPEG", jpeg)
        where = f"images of {uri}/train/n00000001: 1 not in the index (e.g. extra.JPEG)"
    else:
        _put(path, b"not gzip")
        where = "not a readable index"
    with pytest.raises(DataLayoutError) as e:
        scan_imagenet(uri)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and where in message, message
    assert f"python -m pipeline data index {uri}" in message
    # check-layout lists everything and says the same; a rebuilt index is accepted again.
    assert cli.main(["check-layout", uri]) == 2
    assert path in capsys.readouterr().err
    assert cli.main(["index", uri]) == 0
    assert scan_imagenet(uri).index_file == path


# ---------------------------------------------------------------- local index


def test_local_index_and_its_spot_check(tmp_path):
    root = tmp_path / "d"
    write_synthetic_imagenet(root, classes=12, train_per_class=2, val_per_class=1, seed=0, workers=1)
    path, written, _ = write_index(root)
    assert path == str(root / INDEX_NAME)
    assert scan_imagenet(root) == written == scan_imagenet(root, use_index=False)
    # One image gone from a class the spot check lists (the first) is found without a full listing.
    (root / "train/n00000000/n00000000_000000.JPEG").unlink()
    with pytest.raises(DataLayoutError, match=r"images of .*/train/n00000000: 1 in the index but missing"):
        scan_imagenet(root)
    # A class the spot check skips is only caught by check-layout, which lists everything.
    write_index(root)
    (root / "train/n00000004/n00000004_000000.JPEG").unlink()  # classes 0,2,3,5,6,8,9,11 are listed
    assert len(scan_imagenet(root).train_files) == 23  # the index (22 images are left on disk)
    assert cli.main(["check-layout", str(root)]) == 2


# ---------------------------------------------------------------- DALI reads the bucket


DALI_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pipeline.config import DataConfig
    from pipeline.data.imagenet import build_train_loader, build_val_loader
    from pipeline.data.layout import scan_imagenet

    cfg = DataConfig(crop_size=32, scale_min=36, scale_max=48, val_resize=36)
    out = {}
    for name, root in (("s3", sys.argv[1]), ("local", sys.argv[2])):
        index = scan_imagenet(root)
        assert (index.index_file is not None) == (name == "s3"), index.index_file
        kw = dict(rank=0, world_size=1, device_id=None, num_threads=1)
        val = build_val_loader(index, cfg, mode="center", scales=(), batch_size=4, **kw)
        train = build_train_loader(index, cfg, global_batch=4, seed=0, **kw)
        out[name] = [torch.cat([x for x, _ in loader.epoch(0)]) for loader in (val, train)]
        out[name] += [torch.cat([y for _, y in loader.epoch(0)]) for loader in (val, train)]
    for a, b in zip(out["s3"], out["local"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    shapes = [list(t.shape) for t in out["s3"][:2]]
    print(json.dumps({"val": shapes[0], "train": shapes[1], "std": float(out["s3"][0].std())}))
    """
)


@pytest.mark.slow
def test_dali_cpu_pipeline_decodes_images_from_the_bucket(s3, local_data):
    uri = _upload(local_data, f"s3://{BUCKET}/dali")
    write_index(uri)
    # DALI's S3 client reads AWS_ENDPOINT_URL once per process: a fresh one with the env set.
    proc = subprocess.run(
        [sys.executable, "-c", DALI_SCRIPT, uri, str(local_data)],
        cwd=ROOT,
        env={**os.environ, **s3, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # Same pixels from the bucket as from the disk, and they are images, not zeros.
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["val"] == [6, 3, 32, 32] and result["train"] == [12, 3, 32, 32]
    assert result["std"] > 0.1
