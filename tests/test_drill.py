"""The node-loss drill (``make drill``), small: 20 epochs of 8 steps on 128 images at 32 px.

Runs ``cluster/drill.py`` as a user would: a moto S3 server, a Ray head and three worker nodes
(cluster/localnodes.py) in their own mount namespaces, rank 0's node killed mid-epoch and
replaced. About 4-8 minutes on 2 cores. Needs root (one mount namespace per node). The other
tests here run the drill's checks on records written the way a run writes them.

    .venv/bin/python -m pytest -q tests/test_drill.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {
    "node isolation",
    "job",
    "rank 0 killed mid-epoch",
    "resumed from a checkpoint",
    "metrics.jsonl epochs",
    "W&B history epochs",
    "W&B values = metrics.jsonl",
    "summary.json",
    "eval of the final checkpoint",
    "training placement",
    "elastic shrink and growth",
}


@pytest.mark.ray
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="the drill needs root, unshare and nsenter (a mount namespace per node)",
)
@pytest.mark.slow
def test_drill_survives_losing_rank_0s_node():
    proc = subprocess.run(
        [
            sys.executable,
            "cluster/drill.py",
            "--epochs",
            "20",  # room after the growth: Ray Train takes 20-40 s to use a node that joined
            "--model",
            "cifar_resnet20",  # tiny checkpoints: the upload to the local S3 server takes no time
            "--classes",
            "4",
            "--train-per-class",
            "32",
            "--val-per-class",
            "4",
            "--crop",
            "32",
            "--batch",
            "16",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    failed = [line for line in report if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, (
        "\n".join(failed + ["-- all:"] + report) + "\n" + proc.stderr[-4000:]
    )
    assert {line[6:].split(":", 1)[0] for line in report} == CHECKS, report


# ---------------------------------------------------------------- the drill's checks, on a fake run


def _load_drill():
    spec = importlib.util.spec_from_file_location("drill", ROOT / "cluster" / "drill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A moto S3 server with the bucket ``drill``; W&B isolated and offline."""
    import logging

    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "HOME": str(tmp_path / "home"),
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(tmp_path / "home" / "wandb"),
        "WANDB__DISABLE_STATS": "true",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fs, _ = pyarrow.fs.FileSystem.from_uri("s3://drill?allow_bucket_creation=true")
    fs.create_dir("drill")
    yield
    server.stop()


def _segment(run_dir: Path, run_id: str | None, rows: Iterable[tuple[int, dict]]) -> str:
    """One offline W&B segment of the run, (step, row) by row, as the pipeline's tracker writes it."""
    import wandb

    from pipeline.config import TrackingConfig
    from pipeline.tracking.tracker import Tracker

    tracker = Tracker.create(
        TrackingConfig(mode="offline", project="p"),
        run_name="drill",
        run_dir=run_dir,
        config={},
        run_id=run_id,
        is_main=True,
    )
    for step, row in rows:
        tracker.log(row, step=step)
    tracker.finish()
    wandb.teardown()
    time.sleep(1.1)  # segment folders are named by their start second
    return tracker.run_id


def _epochs(epochs: list[int]) -> Iterator[tuple[int, dict]]:
    """A step row in the middle of each epoch, then the epoch's row."""
    for epoch in epochs:
        yield 10 * epoch - 5, {"train/step_loss": 1.0, "epoch": epoch - 0.5}
        yield 10 * epoch, {"epoch": epoch, "train/loss": 2.0 / epoch, "val/top1_err": 50.0 - epoch}


def _steps(steps: range) -> Iterator[tuple[int, dict]]:
    """A step row per step (what the drill's run logs)."""
    return ((step, {"train/step_loss": 1.0, "epoch": step / 10}) for step in steps)


def test_wandb_sync_merges_a_runs_segments_in_the_bucket(bucket, tmp_path):
    """Two offline segments in the bucket (the resumed one redoes epoch 2, the killed one lost
    nothing here): `pipeline wandb-sync` builds one history, each epoch once with metrics.jsonl's
    values and one row per step."""
    import pyarrow.fs

    from pipeline.store import locations
    from pipeline.tracking.offline import read_wandb_history
    from pipeline.tracking.sync import main as wandb_sync

    run_uri = "s3://drill/runs/drill"
    local = tmp_path / "run"
    run_id = _segment(local, None, _epochs([1, 2]))  # the segment of the killed rank 0
    _segment(local, run_id, _epochs([2, 3]))  # the resumed run redoes epoch 2
    records = [
        {"epoch": e, "step": 10 * e, "train/loss": 2.0 / e, "val/top1_err": 40.0 - e} for e in (1, 2, 3)
    ]
    locations.write_bytes(f"{run_uri}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    fs, path = locations.filesystem(run_uri)
    pyarrow.fs.copy_files(str(local / "wandb"), f"{path}/wandb", destination_filesystem=fs)

    assert wandb_sync([run_uri, "--dry-run", "--out", str(tmp_path / "merged")]) == 0
    (merged,) = (tmp_path / "merged").glob("wandb/offline-run-*/run-*.wandb")
    history = read_wandb_history(merged)
    assert [(r["epoch"], r["train/loss"], r["val/top1_err"]) for r in history if "train/loss" in r] == [
        (r["epoch"], r["train/loss"], r["val/top1_err"]) for r in records
    ]
    assert [r["_step"] for r in history] == [5, 10, 15, 20, 25, 30]  # the replayed step 15 once
    assert wandb_sync(["s3://drill/runs/none", "--dry-run"]) == 2  # no run there: a clear error


def test_drill_checks_say_what_is_missing(bucket, tmp_path):
    from pipeline.store.rundir import RunDir

    drill = _load_drill()
    uri = "s3://drill/runs/none"
    empty = SimpleNamespace(run_uri=uri, run=RunDir(uri), args=SimpleNamespace(epochs=3), root=tmp_path)
    check = drill.Check()
    assert drill.check_metrics(empty, check) == [] and drill.check_summary(empty, check) is None
    assert [ok for ok, _, _ in check.lines] == [False, False] and "does not exist" in check.lines[0][2]


def test_resumed_check_tells_a_resume_from_a_fresh_start(bucket, tmp_path):
    """The drill's "resumed" check reads where each W&B segment in the bucket begins: right after
    the checkpoint of the epoch before the kill passes, a segment that began at step 1 again fails."""
    import pyarrow.fs

    from pipeline.store import locations
    from pipeline.store.rundir import RunDir

    drill = _load_drill()
    uri, local = "s3://drill/runs/resumed", tmp_path / "run"
    run = RunDir(uri)
    run.write_config({"derived": {"iters_per_epoch": 10}})
    fake = SimpleNamespace(run_uri=uri, run=run)
    fs, path = locations.filesystem(uri)

    def verdict() -> tuple[bool, str]:
        pyarrow.fs.copy_files(str(local / "wandb"), f"{path}/wandb", destination_filesystem=fs)
        check = drill.Check()
        drill.check_resumed(fake, check, {"epoch": 3})  # killed in epoch 3: resumes after epoch 2
        ((ok, what, detail),) = check.lines
        assert what == "resumed from a checkpoint"
        return ok, detail

    run_id = _segment(local, None, _steps(range(1, 26)))  # rank 0 killed at step 25, in epoch 3
    _segment(local, run_id, _steps(range(21, 31)))  # resumed from checkpoint_epoch0002 (step 20)
    ok, detail = verdict()
    assert ok and "begin at steps [1, 21]" in detail and "epochs [2]" in detail, detail
    _segment(local, run_id, _steps(range(1, 31)))  # a later start from scratch
    ok, detail = verdict()
    assert not ok and "begin at steps [1, 21, 1]" in detail, detail
