"""The shared-path preflight on a real multi-node Ray cluster on this machine.

A head and a second raylet share the machine, but the second runs in its own mount namespace
(``unshare --mount --propagation private``) with a tmpfs mounted over the folder that holds
the run's storage and dataset: to that node the folder is empty, as a local disk on another
machine would be. ``train`` must stop before any worker starts, naming the storage path, the
node and ``s3://``; with the second raylet started plainly (it sees the folder), the same
config passes ``--dry-run``.

The nodes come from cluster/localnodes.py (the drill's harness too): each with its own temp
dir, random ports and token auth; teardown stops only the processes started here (by a marker
in their environment), never ``ray stop``.

    .venv/bin/python -m pytest -q tests/test_cluster_paths.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from localnodes import LocalNodes, can_unshare_mounts

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


class Nodes(LocalNodes):
    """A head and joined raylets (1 CPU each); the workers import this checkout's ``pipeline``."""

    def __init__(self) -> None:
        super().__init__("paths", env={"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"})

    def train(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``python -m pipeline train`` as a driver joining this cluster."""
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "train", *args],
            cwd=ROOT,
            env={
                **self.client_env,
                "PYTHONPATH": str(ROOT),
                "WANDB_MODE": "offline",
                "RAY_ADDRESS": self.gcs,
                **(env or {}),
            },
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def nodes():
    if not can_unshare_mounts():
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    cluster = Nodes()
    try:
        cluster.start("head", head=True)
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftover_pids(), "processes of the test cluster survived teardown"


@pytest.fixture(scope="module")
def shared(nodes):
    """A folder holding the dataset and the runs: what the namespaced node will not see."""
    from pipeline.data.prep.synth import write_synthetic_imagenet

    folder = Path(tempfile.mkdtemp(prefix="rcpaths-shared-"))
    write_synthetic_imagenet(folder / "data", classes=2, train_per_class=4, val_per_class=2, seed=0)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def overrides(shared: Path) -> list[str]:
    return [
        "--config",
        "configs/demo.yaml",
        f"data.root={shared / 'data'}",
        "model.num_classes=2",
        "optim.batch_size=2",
        "cluster.num_workers=2",
        "cluster.placement_strategy=STRICT_SPREAD",
        f"checkpoint.storage_path={shared / 'runs'}",
    ]


def test_local_storage_invisible_on_a_node_stops_training(nodes, shared):
    nodes.start("blind", hide=[shared])
    ids = nodes.wait_alive({"head", "blind"})
    try:
        proc = nodes.train(*overrides(shared))
    finally:
        nodes.stop_node("blind")
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout[-3000:] + err[-3000:]
    blind = ids["blind"][:8]
    assert f"checkpoint.storage_path={shared / 'runs'} is a local folder that" in err, err[-3000:]
    assert f"(node {blind}) cannot see" in err and "s3://" in err, err[-3000:]
    assert f"data.root={shared / 'data'}: {shared / 'data' / 'train'} does not exist on" in err
    assert ids["head"][:8] not in err.split("cannot see")[0].split("that")[-1]  # the head sees it
    # Stopped before the trainer: no "Ray: ... backend" line, no worker output.
    assert "backend gloo" not in proc.stdout and "RayTrainWorker" not in proc.stdout + err
    assert not list((shared / "runs").glob(".pipeline-visibility-*")), "marker left behind"


def test_local_storage_visible_on_every_node_is_accepted(nodes, shared):
    nodes.start("plain")
    nodes.wait_alive({"head", "plain"})
    try:
        # What Ray's job supervisor hands a submitted job's driver: the job's runtime env. Its
        # WANDB_MODE=online beats the nodes' offline, which shows the checks run inside it.
        job = {"runtime_env": {"env_vars": {"WANDB_MODE": "online", "PIPELINE_PROBE": "value-not-shown"}}}
        proc = nodes.train(
            *overrides(shared), "--dry-run", env={"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
        )
    finally:
        nodes.stop_node("plain")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert f"storage: {shared / 'runs'} (local) visible from 2 of 2 node(s) up" in out, out[-3000:]
    assert f"data: {shared / 'data'} (local) present on 2 of 2 node(s) up" in out
    # A cluster started by hand: its read-only autoscaler adds nothing, so `auto` is decided now.
    assert "scaling: fixed" in out and "GPUs: no (the cluster's nodes are fixed" in out, out[-3000:]
    assert "workers: 2 worker(s) x {CPU: 1} (STRICT_SPREAD): fits" in out
    assert "environment: the job's runtime env" in out and "env_vars: PIPELINE_PROBE, WANDB_MODE" in out
    assert "value-not-shown" not in out
    assert "rank 0 would log online on 2 node(s)" in out and "has no WANDB_API_KEY" in out, out[-3000:]
    assert not list((shared / "runs").glob(".pipeline-visibility-*")), "marker left behind"
