"""The shared-path preflight on a real multi-node Ray cluster on this machine.

A head and a second raylet share the machine, but the second runs in its own mount namespace
(``unshare --mount --propagation private``) with a tmpfs mounted over the folder that holds
the run's storage and dataset: to that node the folder is empty, as a local disk on another
machine would be. ``train`` must stop before any worker starts, naming the storage path, the
node and ``s3://``; with the second raylet started plainly (it sees the folder), the same
config passes ``--dry-run``.

Each node gets its own temp dir, random ports and token auth; teardown signals only the
``ray start --block`` processes started here and whatever still carries this cluster's marker
in its environment (never ``ray stop``).

    .venv/bin/python -m pytest -q tests/test_cluster_paths.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from localnodes import free_ports, kill_marked, pids_with_env

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
MARKER = "RESNET_PATHS_CLUSTER"
NODE_LIST = (
    "import json, sys, ray._raylet as r\n"
    "infos = r.GcsClient(address=sys.argv[1]).get_all_node_info(timeout=20).values()\n"
    "print(json.dumps([[i.node_id.hex(), i.state == 0, dict(i.resources_total)] for i in infos]))\n"
)


def can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "none", "/mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


class Nodes:
    """A head and joined raylets, each a ``ray start --block`` child of this process."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rcpaths-", dir="/tmp"))  # short: unix socket paths
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.token_path.chmod(0o600)
        self.ports = free_ports(24)
        self.gcs = f"127.0.0.1:{self.ports.pop()}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        self.client_env = {
            **base,
            "PYTHONPATH": str(ROOT),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "WANDB_MODE": "offline",
        }
        self.node_env = {**self.client_env, MARKER: str(self.root)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *, head: bool = False, hide: Path | None = None) -> None:
        """Start a raylet; ``hide``: mount an empty tmpfs over that folder for this node only."""
        port = lambda: str(self.ports.pop())  # noqa: E731
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
            "--num-cpus", "1", "--resources", json.dumps({f"paths_{name}": 1}),
            "--temp-dir", str(self.root / name), "--object-store-memory", str(100 * 1024**2),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--node-manager-port", port(), "--object-manager-port", port(),
            "--dashboard-agent-listen-port", port(), "--dashboard-agent-grpc-port", port(),
            "--runtime-env-agent-port", port(), "--metrics-export-port", port(),
        ]  # fmt: skip
        if head:
            cmd += ["--head", "--port", self.gcs.split(":")[1], "--include-dashboard", "false"]
            cmd += ["--ray-client-server-port", port()]
        else:
            cmd += ["--address", self.gcs]
        if hide is not None:
            # The tmpfs lives in the new mount namespace only; it goes when the node's last process does.
            cmd = [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs none "$1" && shift && exec "$@"', "sh", str(hide), *cmd,
            ]  # fmt: skip
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            cmd, env=self.node_env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) did not come up:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> dict[str, str]:
        """Node id -> this test's name for it, for every node the GCS holds alive."""
        out = subprocess.run(
            [sys.executable, "-c", NODE_LIST, self.gcs],
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        nodes = {}
        for node_id, alive, resources in json.loads(out.stdout.strip().splitlines()[-1]):
            names = [k.removeprefix("paths_") for k in resources if k.startswith("paths_")]
            if alive and names:
                nodes[node_id] = names[0]
        return nodes

    def wait_alive(self, names: set[str]) -> dict[str, str]:
        deadline = time.monotonic() + 120
        while set((nodes := self.alive()).values()) != names:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes alive: {nodes}, expected {names}")
            time.sleep(1)
        return {name: node_id for node_id, name in nodes.items()}

    def stop_node(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "head"] + ["head"] * ("head" in self.procs):
            self.stop_node(name)
        kill_marked(f"{MARKER}={self.root}")
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        return pids_with_env(f"{MARKER}={self.root}")

    def train(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``python -m pipeline train`` as a driver joining this cluster."""
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "train", *args],
            cwd=ROOT,
            env={**self.client_env, "RAY_ADDRESS": self.gcs, **(env or {})},
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
    from pipeline.data.synth import write_synthetic_imagenet

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
    nodes.start("blind", hide=shared)
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
