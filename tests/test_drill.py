"""The drill (``make drill``), small: 24 epochs of 16 steps on 256 images at 32 px.

Runs ``make drill`` as cluster/README writes it: a moto S3 server, a Ray head and three worker
nodes (cluster/localnodes.py) in their own mount namespaces; rank 0's node killed mid-epoch and
replaced, then the job stopped and submitted again, then the head lost and the job submitted
again to a new cluster, all in one run (one cluster start, one upload, one final eval: each of
them costs the suite as much as an event). About 4-8 minutes on 2 cores. Needs root (one mount
namespace per node). The other tests here run the drill's checks (cluster/drill_checks.py) on
records written the way a run writes them.

    .venv/bin/python -m pytest -q tests/test_drill.py
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
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
    "job stopped mid-epoch",
    "head lost mid-epoch",
    "resumed from a checkpoint",
    "resumed after each resubmission",
    "metrics.jsonl epochs",
    "W&B history epochs",
    "W&B values = metrics.jsonl",
    "one W&B run",
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
@pytest.mark.timeout(1500)  # above the drill's own 1200 s limit, which reports its checks
def test_drill_loses_rank_0s_node_then_the_job_then_the_head():
    """``make drill`` as README and cluster/README write it, its defaults: rank 0's node lost (the
    run shrinks to 2 workers and grows back to 3 on a new node), then ``ray job stop`` mid-epoch
    and the job submitted again, then the head killed whole mid-epoch, its workers with it, a new
    cluster started and the job submitted again there."""
    proc = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "drill"],
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
    # The drill's progress lines: the time from each event to the first step of the job again.
    again = re.findall(r"^== .* first step \d+\.\d s after the (stop|head)$", proc.stdout, re.M)
    assert again == ["stop", "head"], proc.stdout[-3000:]


def test_kill_events_take_rank0_first_then_stops_and_head_losses():
    import argparse

    drill = importlib.import_module("drill")  # cluster/drill.py (conftest puts cluster/ on sys.path)
    assert drill.kill_events("rank0,stop,head") == ["rank0", "stop", "head"]
    assert drill.kill_events("head,stop") == ["head", "stop"]
    assert drill.kill_events("preempt") == ["preempt"]
    for bad in ("stop,rank0", "rank0,rank0", "rank0,preempt", "node"):
        with pytest.raises(argparse.ArgumentTypeError, match="rank0 or preempt \\(first, if at all\\)"):
            drill.kill_events(bad)
    assert drill.parse_args([]).kill == ["rank0", "stop", "head"]
    assert drill.parse_args(["--layout", "sharded", "--faults", "503:10,cut:20"]).faults == {
        "slowdown_every": 10,
        "cut_every": 20,
    }
    assert drill.parse_args([]).faults == {}
    for bad in (["--faults", "503:10"], ["--layout", "sharded", "--faults", "503:0"]):
        with pytest.raises(SystemExit):
            drill.parse_args(bad)  # the folder layout's JPEG GETs are not retried; N >= 1


# ---------------------------------------------------------------- the drill's checks, on a fake run


def _load_checks():
    """cluster/drill_checks.py (conftest puts cluster/ on sys.path); imported in the tests, not at
    collection, since it brings in the pipeline's storage and the node harness."""
    return importlib.import_module("drill_checks")


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

    checks = _load_checks()
    uri = "s3://drill/runs/none"
    empty = SimpleNamespace(run_uri=uri, run=RunDir(uri), args=SimpleNamespace(epochs=3), root=tmp_path)
    check = checks.Check()
    assert checks.check_metrics(empty, check) == [] and checks.check_summary(empty, check) is None
    assert [ok for ok, _, _ in check.lines] == [False, False] and "does not exist" in check.lines[0][2]


def test_resumed_check_reads_which_records_survived():
    """A worker group that restored epoch k keeps metrics.jsonl's records of epochs 1..k: after a
    kill in epoch 4 of a group of 3, epochs 1-3 stay the group of 3's and epoch 4 is the group of
    2's. A fresh start (all records redone) or a resume from an older checkpoint fails."""
    checks = _load_checks()
    fake = SimpleNamespace(args=SimpleNamespace(workers=3))

    def verdict(sizes: list[int]) -> tuple[bool, str]:
        check = checks.Check()
        records = [{"epoch": i + 1, "world_size": size} for i, size in enumerate(sizes)]
        checks.check_resumed(fake, check, {"epoch": 4}, records)
        ((ok, what, detail),) = check.lines
        assert what == "resumed from a checkpoint"
        return ok, detail

    ok, detail = verdict([3, 3, 3, 2, 2, 3, 3])
    assert ok and "epochs 1-3 recorded by groups of [3]" in detail and "epoch 4 by [2]" in detail, detail
    assert not verdict([2, 2, 2, 2, 2, 3, 3])[0]  # the group of 2 started from scratch
    assert not verdict([3, 3, 2, 2, 2, 3, 3])[0]  # ... from the checkpoint of epoch 2
    assert not verdict([3, 3, 3, 3, 3, 3, 3])[0]  # no group of 2 recorded the kill's epoch
    check = checks.Check()
    checks.check_resumed(fake, check, None, [])  # nothing killed: nothing resumed
    assert check.lines[0][0] is False


def test_shard_gets_check_bounds_the_gets_by_shards_and_nodes():
    """--layout sharded: every shard came from the bucket at least once, no node fetched one twice
    (GETs of .tar objects <= shards x nodes), and the replacement filled its own cache."""
    checks = _load_checks()
    cached = {"head": 1, "worker1": 9, "worker3": 10, "worker4": 7}  # live nodes (worker2 killed)

    def ok(gets: int, cached: dict = cached) -> bool:
        return checks.shard_gets(gets, 10, 5, 148, cached, "worker4")[0]

    passed, detail = checks.shard_gets(45, 10, 5, 148, cached, "worker4")
    assert passed and "45 GETs of .tar objects for 10 shards x 5 nodes (at most 50)" in detail, detail
    assert "0.304 GETs per image (148 images)" in detail and "worker4 7" in detail, detail
    assert ok(10) and ok(50)  # once in all; every node fetched every shard once
    assert not ok(51)  # some node fetched a shard twice
    assert not ok(9)  # a shard never came from the bucket
    assert not ok(45, {**cached, "worker4": 0})  # the replacement's cache is empty
    assert not ok(45, {k: v for k, v in cached.items() if k != "worker4"})  # no replacement alive
    assert not ok(45, {**cached, "worker1": 11})  # a cache holds shards of another dataset
    # --faults: the GETs refused or cut were retried; they are not fetches, and some must have failed.
    failed = {"refused (503)": 6, "cut": 3}
    passed, detail = checks.shard_gets(54, 10, 5, 148, cached, "worker4", failed)
    assert (
        passed
        and "45 GETs of .tar objects (and 9 that failed and were retried: 6 refused (503), 3 cut)" in detail
    )
    assert not checks.shard_gets(60, 10, 5, 148, cached, "worker4", failed)[0]  # 51 fetches: one twice
    assert not checks.shard_gets(45, 10, 5, 148, cached, "worker4", {"refused (503)": 0, "cut": 0})[0]


def test_resubmitted_check_wants_the_records_before_each_event_kept():
    """A job submitted again after a stop in epoch 3 and a head loss in epoch 5 restores epochs 2
    and 4 and keeps the records of the epochs before as they were. A job that started again
    (other times in the records) or restored an older checkpoint fails."""
    checks = _load_checks()
    records = [{"epoch": e, "epoch_time_s": 1.0 + e / 10} for e in range(1, 7)]
    events = [
        {"kind": "stop", "records": records[:2], "restored": 2},
        {"kind": "head", "records": records[:4], "restored": 4},
    ]

    def verdict(records: list[dict], events: list[dict] = events) -> tuple[bool, str]:
        check = checks.Check()
        checks.check_resubmitted(None, check, events, records)
        ((ok, what, detail),) = check.lines
        assert what == "resumed after each resubmission"
        return ok, detail

    ok, detail = verdict(records)
    assert ok and detail == "epochs 1-2 kept over the stop, 1-4 kept over the head", detail
    again = [{**r, "epoch_time_s": 9.0} for r in records]  # every epoch run again after the head loss
    ok, detail = verdict(records[:2] + again[2:])
    assert not ok and "epochs 1-4 differ from the records in the bucket at the head" in detail, detail
    older = [events[0], {**events[1], "restored": 2}]
    ok, detail = verdict(records, older)
    assert not ok and "in epoch 5 the job restored epoch 2, not 4 or later" in detail, detail
    assert not verdict(records, [])[0]  # nothing stopped or lost: nothing resumed


def test_one_wandb_run_check_wants_one_id_over_every_job(bucket, tmp_path):
    """Each job's offline segment in the bucket, all of one run id; a job that started a new run
    id (or left no segment) fails the check."""
    import pyarrow.fs

    from pipeline.store import locations

    checks = _load_checks()
    run_uri, local = "s3://drill/runs/one-run", tmp_path / "run"  # moto keeps the other tests' objects
    fake = SimpleNamespace(run_uri=run_uri)
    run_id = _segment(local, None, _epochs([1, 2]))
    _segment(local, run_id, _epochs([2, 3]))
    fs, path = locations.filesystem(run_uri)
    pyarrow.fs.copy_files(str(local / "wandb"), f"{path}/wandb", destination_filesystem=fs)

    def verdict(events: int) -> tuple[bool, str]:
        check = checks.Check()
        checks.check_one_wandb_run(fake, check, [{}] * events)
        ((ok, what, detail),) = check.lines
        assert what == "one W&B run"
        return ok, detail

    ok, detail = verdict(1)
    assert ok and detail == f"2 segments (at least 2: one per job) of run ids ['{run_id}']", detail
    assert verdict(0)[0]  # one job whose worker group Ray Train started again
    assert not verdict(2)[0]  # a third job left no segment
    _segment(local, None, _epochs([3]))  # a job that began a run of its own
    pyarrow.fs.copy_files(str(local / "wandb"), f"{path}/wandb", destination_filesystem=fs)
    ok, detail = verdict(2)
    assert not ok and "3 segments (at least 3: one per job) of run ids" in detail, detail


def test_preemption_story_reads_the_notice_the_last_checkpoint_and_the_restore():
    """The preemption drill's checks read the job's log: the notice's node and checkpoint, the
    last checkpoint before the deadline, the step the next group restored and the killed
    group's last step line before that."""
    checks = _load_checks()
    log = "\n".join(
        [
            "(RayTrainWorker pid=1) epoch 4.25/24 step 52/384 loss 1.1 lr 0.1 img/s 90 eta 1m",
            "(RayTrainWorker pid=1) preemption notice: node a8e025a4 (ranks [0]) drained; checkpoint at step 68 "
            "uploaded in 0.1 s, 15.1 s before the deadline (polls every 31 steps (about 5 s), 9.6 ms a poll)",
            "(RayTrainWorker pid=1) epoch 6.00/24 step 96/384 loss 1.0 lr 0.1 img/s 90 eta 1m",
            "(RayTrainWorker pid=1) last checkpoint before the deadline at step 99 uploaded in 0.1 s, 5.2 s before "
            "the deadline (polls every 31 steps (about 5 s), 9.6 ms a poll); waiting for the reclaim",
            "(RayTrainWorker pid=1) epoch 6.19/24 step 99/384 loss 1.0 lr 0.1 img/s 90 eta 1m",
            "(RayTrainWorker pid=7) restored from checkpoint s3://drill/runs/drill/checkpoint_epoch0006_step0000099: "
            "epoch 6, step 99",
            "(RayTrainWorker pid=7) epoch 6.25/24 step 100/384 loss 1.0 lr 0.1 img/s 90 eta 1m",
        ]
    )
    story = checks.preemption_story(log)
    assert story == {
        "node": "a8e025a4", "step": 68, "upload_s": 0.1, "when": "15.1 s before", "every": 31,
        "last_step": 99, "last_when": "5.2 s before", "restored": 99, "trained_to": 99,
    }  # fmt: skip
    assert checks.preemption_story(log.replace("preemption notice", "a notice")) is None
