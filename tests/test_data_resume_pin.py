"""A resume in the middle of an epoch reads the data order it was saved in, or does not start.

Checkpoints record the sharded layout's manifest SHA-256 and ``data.shuffle_window``. One-process
``pipeline train --no-ray`` runs (in this process): two epochs with mid-epoch checkpoints, the
last epoch-end one removed (as if the run had been killed in epoch 2); a resume over another
manifest (or window) stops before training, naming both digests and the checkpoints to remove
to redo the epoch from its start (and the command under Ray stops in the driver, before Ray
starts: exit 1, no traceback); once they are removed, the run resumes at the epoch boundary
over the new data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_pipeline, tiny_overrides
from shard_data import ROOT

import pipeline.__main__
from pipeline.data.shard_manifest import MANIFEST_NAME


@pytest.fixture(scope="module")
def resharded(sharded, tmp_path_factory) -> Path:
    """The same shards under another manifest (a field rewritten): another digest, as after a re-shard."""
    out = tmp_path_factory.mktemp("resharded") / "out"
    shutil.copytree(sharded, out)
    doc = json.loads(gzip.decompress((out / MANIFEST_NAME).read_bytes()))
    doc["tool"] += " (rewritten)"
    (out / MANIFEST_NAME).write_bytes(gzip.compress(json.dumps(doc).encode(), mtime=0))
    return out


def _command(root: Path, runs: Path, *extra: str) -> list[str]:
    """Two epochs of 3 steps (batch 32 of 120 images), a checkpoint every 2 steps too, all kept; a
    small network (1 MB checkpoints)."""
    overrides = tiny_overrides(root, runs, "pinned") + [
        "cluster.num_workers=1", "schedule.epochs=2", "optim.batch_size=32", "model.name=cifar_resnet20",
        "checkpoint.every_n_steps=2", "checkpoint.num_to_keep=10", "eval.final_mode=center",
        "tracking.mode=disabled", *extra,
    ]  # fmt: skip
    return ["train", "--config", str(ROOT / "configs/demo.yaml"), *overrides]


def _train(root: Path, runs: Path, *extra: str) -> int:
    return pipeline.__main__.main([*_command(root, runs, *extra), "--no-ray"])


def _digest(root: Path) -> str:
    return hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()


@pytest.mark.slow  # trains (one process, --no-ray): not in make test-fast
def test_a_mid_epoch_resume_over_another_manifest_stops_and_says_how_to_switch(
    sharded, resharded, tmp_path, capsys
):
    runs = tmp_path / "runs"
    run = runs / "pinned"
    assert _train(sharded, runs) == 0
    shutil.rmtree(run / "checkpoint_epoch0002")  # killed in epoch 2, after its step-4 checkpoint
    kept = sorted(p.name for p in run.glob("checkpoint_*"))
    assert kept == [f"checkpoint_epoch000{e}" for e in ("0_step0000002", "1", "1_step0000004")]
    capsys.readouterr()

    # The command as a user types it, under Ray: refused by the driver before Ray or any worker starts.
    ray = run_pipeline(*_command(resharded, runs), timeout=240)
    old, new = _digest(sharded), _digest(resharded)
    assert ray.returncode == 1, ray.stderr[-3000:]
    assert "Traceback" not in ray.stderr and ray.stderr.startswith("error: "), ray.stderr[-3000:]
    assert old in ray.stderr and new in ray.stderr and "at an epoch boundary" in ray.stderr
    assert "Ray" not in ray.stdout + ray.stderr  # no local Ray was started, no worker ran
    assert sorted(p.name for p in run.glob("checkpoint_*")) == kept

    assert _train(resharded, runs) == 1
    error = capsys.readouterr().err
    assert old != new and old in error and new in error
    assert "middle of epoch 2 (step 4)" in error and f"data.root={sharded}" in error
    assert f"remove {run / 'checkpoint_epoch0001_step0000004'} " in error
    assert sorted(p.name for p in run.glob("checkpoint_*")) == kept  # nothing trained, nothing saved
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # Another window over the same manifest changes the order too.
    assert _train(sharded, runs, "data.shuffle_window=2") == 1
    assert "data.shuffle_window=16; data.root=" in capsys.readouterr().err

    # As the message says: without the mid-epoch checkpoint, epoch 2 is redone over the new data.
    shutil.rmtree(run / "checkpoint_epoch0001_step0000004")
    assert _train(resharded, runs) == 0
    out = capsys.readouterr().out
    assert "restored from checkpoint" in out and "the next epoch reads the new data" in out
    assert (run / "checkpoint_epoch0002").is_dir()
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
