"""Checkpoints and resume: one retention policy, a killed worker, a stopped and restarted run, a
truncated checkpoint.

Every run here is a real ``python -m pipeline train`` process on the tiny generated dataset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline, tiny_overrides

from pipeline.tracking.offline import read_wandb_history
from pipeline.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def epochs_in(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line.strip()]


def train_cmd(*overrides: str, no_ray: bool = False) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--config",
        "configs/demo.yaml",
        *(["--no-ray"] if no_ray else []),
        *overrides,
    ]


def train(
    *overrides: str, no_ray: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline train`` to completion and capture its output."""
    return subprocess.run(
        train_cmd(*overrides, no_ray=no_ray), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def env_with_marker(marker: str) -> dict[str, str]:
    return {**os.environ, "PIPELINE_TEST_MARKER": marker, "PYTHONUNBUFFERED": "1"}


def processes_with_marker(marker: str, name: str) -> list[int]:
    """PIDs whose command line holds ``name`` and whose environment carries our marker (so
    Ray processes of anything else on the machine are never touched)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if name in cmdline and f"PIPELINE_TEST_MARKER={marker}".encode() in environ:
            found.append(int(entry.name))
    return found


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"training exited early with {proc.returncode}:\n{out[-4000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for training progress")


class OutputReader:
    """Collects a process's output on a thread, so the test can watch it while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def rank0_pid(lines: list[str]) -> int | None:
    """The pid of the worker printing step lines: rank 0."""
    for line in list(lines):
        m = re.match(r"\(RayTrainWorker pid=(\d+)\) epoch [\d.]+/\d+ step", line)
        if m:
            return int(m[1])
    return None


@pytest.mark.ray
@pytest.mark.slow
def test_sigkilled_rank0_resumes_mid_epoch_and_wandb_history_is_whole(tiny_imagenet, tmp_path):
    """Rank 0 SIGTERMed in the middle of epoch 3, once a mid-epoch checkpoint of it is whole (the
    upload runs in the background), as a pod deleted with a grace period: a preemption notice,
    on which every rank checkpoints at its next poll; then SIGKILLed, as its node going away.
    The run resumes at that step or a later whole one, each epoch appears once in metrics.jsonl,
    and the merged W&B history (what `pipeline wandb-sync` uploads) holds every epoch once with
    metrics.jsonl's values."""
    marker = uuid.uuid4().hex
    overrides = tiny_overrides(tiny_imagenet, tmp_path, "killed") + [
        "schedule.epochs=5",
        "cluster.max_failures=1",
        "checkpoint.every_n_steps=2",  # epoch 3 is steps 17-24: mid-epoch checkpoints at 18, 20, 22
        "tracking.log_every_n_steps=2",
        "cluster.preemption_poll_s=0.3",  # a poll every few steps (pipeline.train.preemption)
    ]
    # The node's temp dir, where rank 0 stages checkpoints for Ray to upload (Ray's own files
    # stay in /tmp/ray: its socket paths must be short).
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    proc = subprocess.Popen(
        train_cmd(*overrides),
        cwd=ROOT,
        env={**env_with_marker(marker), "TMPDIR": str(node_tmp), "RAY_TMPDIR": "/tmp"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    reader = OutputReader(proc)
    run_dir = tmp_path / "killed"
    mid_epoch_3 = [run_dir / f"checkpoint_epoch0002_step{s:07d}" for s in (18, 20, 22)]

    def whole(folder: Path) -> bool:  # uploads run in the background: a state.pt may still be growing
        try:
            ckpt.read(folder)
            return True
        except ckpt.CheckpointError:
            return False

    try:
        # The first one is whole shortly after step 18: the kill lands a few steps before epoch 3 ends.
        wait_for(lambda: any(whole(p) for p in mid_epoch_3), 300, proc)
        rank0 = rank0_pid(reader.lines)
        os.kill(rank0, signal.SIGTERM)  # noted, not the end: training goes on
        wait_for(lambda: "preemption notice: a worker got SIGTERM" in "".join(reader.lines), 120, proc)
        os.kill(rank0, signal.SIGKILL)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = reader.text()
    assert proc.returncode == 0, out[-4000:]
    assert epochs_in(run_dir / "metrics.jsonl") == [1, 2, 3, 4, 5], out[-4000:]
    restored = [line for line in out.splitlines() if "restored from checkpoint" in line]
    # The newest whole checkpoint at the kill: one inside an epoch (a later one cut short by the
    # kill mid-upload is skipped with a warning).
    resumed = re.search(r"_step\d+: epoch \d+, step (\d+)", restored[0]) if restored else None
    assert resumed and int(resumed[1]) >= 18 and int(resumed[1]) % 8, out[-4000:]
    notice = re.search(
        r"checkpoint at step (\d+) uploaded in [\d.]+ s, no deadline given \(polls every \d+ steps", out
    )
    assert notice and int(resumed[1]) >= int(notice[1]), out[-4000:]  # that checkpoint or a newer one
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 5 and summary["steps"] == 5 * 8
    # The killed rank 0's queued checkpoints are removed by its successor; Ray deleted the rest.
    assert not list(node_tmp.rglob("checkpoint_*")), sorted(p.name for p in node_tmp.rglob("checkpoint_*"))

    merged = run_pipeline("wandb-sync", str(run_dir), "--dry-run", "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "merged 2 segment(s)" in merged.stdout and "not uploaded (--dry-run)" in merged.stdout
    (history_file,) = (tmp_path / "merged").glob("wandb/offline-run-*/run-*.wandb")
    history = read_wandb_history(history_file)
    epoch_rows = [r for r in history if "train/loss" in r]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epoch_rows] == [1, 2, 3, 4, 5]
    for row, record in zip(epoch_rows, records, strict=True):
        assert row["_step"] == record["step"]
        assert row["train/loss"] == pytest.approx(record["train/loss"])
        assert row["val/top1_err"] == pytest.approx(record["val/top1_err"])
    steps = [r["_step"] for r in history]
    assert steps == sorted(set(steps))  # one row per step, in order: nothing replayed twice
    # The same run started again continues from its latest checkpoint: with more epochs by
    # test_uri_storage_holds_run_files_and_resumes; under Ray by make degradation's re-run
    # (tests/test_degradation.py) and the drill's job submitted again (tests/test_drill.py).


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted(run_dir.glob("checkpoint_epoch*"))[-1]
    return ckpt.read(latest)["model"]


@pytest.fixture(scope="module")
def tiny_sharded(tiny_imagenet, tmp_path_factory) -> Path:
    """tiny_imagenet in the sharded layout (``data shard``), several windows of shards."""
    from pipeline.data.prep.shard_writer import write_shards

    out = tmp_path_factory.mktemp("tiny-sharded") / "shards"
    write_shards(str(tiny_imagenet), str(out), shard_size_mb=0.05, seed=0, workers=1, progress=None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "sharded"])
def test_stopped_mid_epoch_resumes_at_that_step_and_matches_uninterrupted(
    tiny_imagenet, tmp_path, layout, request
):
    root = tiny_imagenet if layout == "folder" else request.getfixturevalue("tiny_sharded")
    common = tiny_overrides(root, tmp_path, "x")[1:] + [
        "data.shuffle_window=2",
        "schedule.epochs=3",  # the lr steps down after epoch 2
        "cluster.num_workers=1",
        "schedule.kind=step",
        "schedule.milestones=[2]",
        "checkpoint.every_n_steps=3",  # mid-epoch checkpoints at steps 3, 6, 9 (epoch 2), ...
        "checkpoint.num_to_keep=20",
    ]
    # The uninterrupted reference.
    ref = train("name=straight", *common, no_ray=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # The same run, stopped (SIGTERM) once the checkpoint at step 9 (inside epoch 2) exists, then
    # started again: it must pick up at step 9 with the same data, augmentation, lr and counters.
    proc = subprocess.Popen(
        train_cmd("name=stopped", *common, no_ray=True),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env_with_marker("stop"),
    )
    mid = tmp_path / "stopped" / "checkpoint_epoch0001_step0000009" / "state.pt"
    try:
        wait_for(mid.is_file, 300, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for later in (tmp_path / "stopped").glob("checkpoint_*"):
        if later.name > mid.parent.name:  # the stop came late: start from step 9 all the same
            shutil.rmtree(later)
    resumed = train("name=stopped", *common, no_ray=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 9" in resumed.stdout

    straight = [
        json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    after = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in after] == [1, 2, 3]  # each epoch exactly once
    assert [(r["step"], r["lr"]) for r in after] == [(r["step"], r["lr"]) for r in straight]
    for a, b in zip(after, straight, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-5)
    # On CPU with fixed seeds the data order, augmentation and arithmetic repeat exactly.
    a, b = model_state(tmp_path / "stopped"), model_state(tmp_path / "straight")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_previous(tiny_imagenet, tmp_path):
    common = tiny_overrides(tiny_imagenet, tmp_path, "trunc") + [
        "cluster.num_workers=1",
        "checkpoint.num_to_keep=2",
    ]
    first = train(*common, "schedule.epochs=3", no_ray=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "trunc"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == [
        "checkpoint_epoch0002",
        "checkpoint_epoch0003",
    ]
    state = run_dir / "checkpoint_epoch0003" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])

    again = train(*common, "schedule.epochs=4", no_ray=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping unusable checkpoint" in again.stdout and "truncated or corrupt" in again.stdout
    assert "epoch 2, step 16" in again.stdout
    assert epochs_in(run_dir / "metrics.jsonl") == [1, 2, 3, 4]

    # With every checkpoint unreadable: a clear message and exit code 1, no torch traceback.
    for path in run_dir.glob("checkpoint_*/state.pt"):
        path.write_bytes(b"not a checkpoint")
    broken = train(*common, "schedule.epochs=5", no_ray=True)
    assert broken.returncode == 1
    assert "none of the checkpoints of run 'trunc' can be read" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_checkpoint_key_mismatch_lists_keys(tmp_path):
    torch.save({"model": {}, "epoch": 1, "surprise": 2}, tmp_path / "state.pt")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read(tmp_path)
    message = str(err.value)
    assert "missing: ['best_val_top1_err', 'config'" in message and "unexpected: ['surprise']" in message

    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    state = {
        "model": build_model(ModelConfig(name="resnet18", num_classes=4)).state_dict(),
        "config": {"model": {"name": "resnet18"}},
    }
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys: \[.*layer4.2.*\]|unexpected keys: \[.*\]"):
        ckpt.restore_model(state, build_model(ModelConfig(name="resnet34", num_classes=4)))


@pytest.mark.slow
def test_uri_storage_holds_run_files_and_resumes(tiny_imagenet, tmp_path):
    """checkpoint.storage_path as a URI goes through pyarrow's filesystems (file:// here; s3:// and
    gs:// take the same path)."""
    store = tmp_path / "bucket"
    common = tiny_overrides(tiny_imagenet, tmp_path, "remote")[:-1] + [
        f"checkpoint.storage_path=file://{store}",
        "cluster.num_workers=1",
        "eval.final_mode=center",
    ]
    first = train(*common, "schedule.epochs=2", no_ray=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run = store / "remote"
    assert (run / "checkpoint_epoch0002" / "state.pt").is_file()
    assert epochs_in(run / "metrics.jsonl") == [1, 2]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    again = train(*common, "schedule.epochs=3", no_ray=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 2, step 16" in again.stdout
    assert epochs_in(run / "metrics.jsonl") == [1, 2, 3]
    final = json.loads((run / "summary.json").read_text())["checkpoint"]
    assert final.endswith("checkpoint_epoch0003"), final
    # Restarted after its last epoch (Ray Train grows a group when a node joins, even during the
    # final evaluation): nothing to train, and the summary still names the final checkpoint.
    done = train(*common, "schedule.epochs=3", no_ray=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert epochs_in(run / "metrics.jsonl") == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["checkpoint"] == final


@pytest.mark.parametrize("where", ["local", "uri"])
def test_one_retention_policy_keeps_the_newest_n_without_ray(tmp_path, where):
    """Without Ray rank 0 prunes: the newest num_to_keep, mid-epoch ones included, in a local
    folder and behind a URI alike (a file:// URI goes through pyarrow as s3:// does)."""
    from pipeline.train.distributed import DistContext

    ctx = DistContext(0, 1, 0, torch.device("cpu"), under_ray=False)
    location = str(tmp_path / "run") if where == "local" else f"file://{tmp_path}/run"
    names = [
        ckpt.checkpoint_name(1),
        ckpt.checkpoint_name(1, 20),
        ckpt.checkpoint_name(2),
        ckpt.checkpoint_name(3),
    ]

    def write(folder: Path) -> None:  # what ckpt.save does with a real state: the folder and state.pt
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ckpt.STATE_FILE).write_bytes(b"x")

    for name in names:
        ckpt.report_checkpoint(ctx, {}, name, location, write, num_to_keep=2)
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert kept == [ckpt.checkpoint_name(2), ckpt.checkpoint_name(3)], kept
    assert ckpt.list_checkpoints(location)[0].endswith(ckpt.checkpoint_name(3))  # newest first


def test_one_retention_policy_under_ray_is_rays_newest_n(recorded_trainer, tmp_path):
    """Under Ray, Ray Train prunes: its CheckpointConfig keeps the newest num_to_keep (no score
    attribute, so not the best by validation error, which resume would never pick)."""
    from pipeline.config import load_config
    from pipeline.driver.ray_runner import run_on_ray

    cfg = load_config(
        None, ["checkpoint.num_to_keep=3", "cluster.use_gpu=false", f"checkpoint.storage_path={tmp_path}"]
    )
    run_on_ray(cfg, worker=lambda loop_config: None)
    kept = recorded_trainer["run_config"].checkpoint_config
    assert kept.num_to_keep == 3 and kept.checkpoint_score_attribute is None
