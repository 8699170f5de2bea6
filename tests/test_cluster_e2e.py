"""A real two-node Ray cluster on this machine, used the way the cluster templates use it.

The head comes from ``ray start --head`` and a second raylet joins with ``ray start
--address``, both with token authentication on (``RAY_AUTH_MODE=token``, the token in a file
named by ``RAY_AUTH_TOKEN_PATH``) and the dashboard bound to loopback. Jobs go in through
``make submit`` with a runtime env derived from ``cluster/runtime_env.yaml``.

Each node gets its own temp dir, its own ports (all random) and a custom resource naming it,
so the two raylets share the host without touching any other Ray running here. Teardown
signals only the ``ray start --block`` processes started here, then kills anything still
carrying this cluster's marker in its environment; it never runs ``ray stop``.

    .venv/bin/python -m pytest -q tests/test_cluster_e2e.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MARKER = "RESNET_E2E_CLUSTER"  # set in the nodes' environment only; teardown looks for it
# A recognisable stand-in for a W&B key delivered to the nodes as a secret (40 chars, the
# length of a real key); nothing the job writes or prints may contain it.
FAKE_WANDB_KEY = "e2e0fake0" + uuid.uuid4().hex[:31]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """Head plus one joined node, each a ``ray start --block`` child of this process."""

    def __init__(self) -> None:
        # Short path: Ray puts unix sockets under the temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="rce2e-", dir="/tmp"))
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        (gcs, dash, client, *self._spare) = free_ports(16)
        self.gcs_port, self.dashboard_port, self.client_port = gcs, dash, client
        self.address = f"http://127.0.0.1:{dash}"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        path = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        # What a client (make submit, ray job ...) needs: token mode and the token file.
        self.client_env = {
            **base,
            "PATH": path,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # What the templates give every node: the same, plus the W&B key from a secret.
        self.node_env = {
            **self.client_env,
            MARKER: str(self.root),
            "WANDB_API_KEY": FAKE_WANDB_KEY,
            "WANDB_MODE": "offline",
            "RAY_DEDUP_LOGS": "0",
        }

    def _port(self) -> str:
        return str(self._spare.pop())

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        cmd = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--resources",
            json.dumps({f"e2e_{name}": 1}),
            "--temp-dir",
            str(self.root / name),
            "--object-store-memory",
            str(100 * 1024**2),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--node-manager-port",
            self._port(),
            "--object-manager-port",
            self._port(),
            "--dashboard-agent-listen-port",
            self._port(),
            "--dashboard-agent-grpc-port",
            self._port(),
            "--runtime-env-agent-port",
            self._port(),
            "--metrics-export-port",
            self._port(),
            *args,
        ]
        proc = subprocess.Popen(cmd, env=self.node_env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        self._wait_log(name, proc, "Ray runtime started")

    def _wait_log(self, name: str, proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited {proc.returncode}:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"ray start ({name}) not ready after {timeout}s:\n{self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> LocalCluster:
        self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(self.client_port),
            ],
        )
        self._start("worker", ["--address", f"127.0.0.1:{self.gcs_port}"])
        deadline = time.monotonic() + 120
        while len(self.alive_nodes()) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"second node never registered: {self.alive_nodes()}")
            time.sleep(1)
        return self

    # ------------------------------------------------------------ the dashboard's HTTP API

    def http(self, path: str, token: str | None = "own", host: str = "127.0.0.1") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{host}:{self.dashboard_port}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(self, path: str) -> dict:
        status, body = self.http(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def alive_nodes(self) -> list[dict]:
        try:
            nodes = self.api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        except (OSError, AssertionError):
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    # ------------------------------------------------------------ jobs, through the Makefile

    def make(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "--no-print-directory", *args],
            cwd=ROOT,
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, config: str, overrides: list[str], runtime_env: Path) -> str:
        proc = self.make(
            "submit",
            f"CONFIG={config}",
            f"ADDRESS={self.address}",
            f"RUNTIME_ENV={runtime_env}",
            "ARGS=" + " ".join(overrides),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        match = re.search(r"^submitted: (\S+)$", proc.stdout, re.M)
        assert match, proc.stdout
        assert f"make job-logs JOB={match.group(1)}" in proc.stdout
        return match.group(1)

    def wait_job(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.api(f"/api/jobs/{job_id}")
            if info["status"] in {"SUCCEEDED", "FAILED", "STOPPED"}:
                return info
            time.sleep(2)
        self.make("job-stop", f"JOB={job_id}", f"ADDRESS={self.address}")
        raise TimeoutError(
            f"job {job_id} still {info['status']} after {timeout}s:\n{self.job_logs(job_id)[-5000:]}"
        )

    def job_logs(self, job_id: str) -> str:
        proc = self.make("job-logs", f"JOB={job_id}", f"ADDRESS={self.address}", "FOLLOW=0")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def actor_nodes(self, class_name: str) -> list[str]:
        """Node ids of every actor of ``class_name`` this cluster has run (dead ones included)."""
        query = f"/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        return [a["node_id"] for a in self.api(query)["data"]["result"]["result"]]

    # ------------------------------------------------------------ teardown (this cluster only)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):  # the joined node first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        # Anything that outlived its parent (a worker mid-spawn) still carries our marker.
        deadline = time.monotonic() + 10
        while (left := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        needle = f"{MARKER}={self.root}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    c = LocalCluster()
    try:
        yield c.start()
    finally:
        c.stop()
        assert not c.leftover_pids(), "processes of the test cluster survived teardown"


@pytest.fixture(scope="module")
def job_runtime_env(cluster) -> Path:
    """cluster/runtime_env.yaml without ``pip``: this venv already holds every pin, and a
    test must not download torch. Everything else (excludes, env vars) is sent as is."""
    spec = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    spec.pop("pip")
    path = cluster.root / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_token_auth_and_loopback_dashboard(cluster):
    assert cluster.http("/api/jobs/", token=None)[0] == 401
    assert cluster.http("/api/jobs/", token="0" * 64)[0] == 403
    assert cluster.http("/api/jobs/")[0] == 200
    # Ray 2.60 replaces a loopback --node-ip-address by the host's routable address; the
    # dashboard (and with it the Jobs API) must still answer on loopback only.
    node_ip = cluster.alive_nodes()[0]["node_ip"]
    if node_ip not in {"127.0.0.1", "::1"}:
        with pytest.raises(OSError):
            socket.create_connection((node_ip, cluster.dashboard_port), timeout=5).close()
    # The CLI without the token is turned away too.
    env = {k: v for k, v in cluster.client_env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(cluster.root / "nohome")
    proc = subprocess.run(
        [RAY, "job", "list", "--address", cluster.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Authentication" in proc.stdout + proc.stderr


def test_trivial_job_spans_both_nodes(cluster, job_runtime_env, tmp_path):
    # A job that pins one task to each node by its custom resource and prints the node ids.
    script = "\n".join(
        [
            "import ray",
            "ray.init()",
            "f = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id())",
            "ids = ray.get([f.options(resources={r: 1}).remote() for r in ('e2e_head', 'e2e_worker')])",
            "print('NODES', len(set(ids)))",
        ]
    )
    # Straight through the Ray CLI: this checks the cluster itself, whatever the pipeline does.
    trivial = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.address,
            "--working-dir",
            str(ROOT),
            "--runtime-env",
            str(job_runtime_env),
            "--",
            "python",
            "-c",
            script,
        ],
        env=cluster.client_env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert trivial.returncode == 0, trivial.stdout[-3000:] + trivial.stderr[-3000:]
    assert "NODES 2" in trivial.stdout


def test_pipeline_job_trains_on_two_nodes(cluster, job_runtime_env, tmp_path):
    data = tmp_path / "synth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "data",
            "synth",
            "--out",
            str(data),
            "--classes",
            "4",
            "--train-per-class",
            "16",
            "--val-per-class",
            "4",
            "--seed",
            "0",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    storage = tmp_path / "runs"
    overrides = [
        "name=e2e",
        f"data.root={data}",
        "model.name=resnet18",
        "model.num_classes=4",
        "data.crop_size=32",
        "data.scale_min=36",
        "data.scale_max=48",
        "data.val_resize=36",
        "optim.batch_size=16",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "cluster.num_workers=2",
        "cluster.use_gpu=false",
        "cluster.cpus_per_worker=1",
        "cluster.placement_strategy=STRICT_SPREAD",
        "eval.final_mode=center",
        "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]
    job = cluster.submit("configs/demo.yaml", overrides, job_runtime_env)
    info = cluster.wait_job(job, timeout=900)
    logs = cluster.job_logs(job)
    assert info["status"] == "SUCCEEDED", logs[-6000:]

    # The final metrics reach the job's logs (rank 0's epoch line and the driver's summary).
    assert "epoch 1/1 done" in logs and "val top1 err" in logs, logs[-3000:]
    assert "== summary ==" in logs and "val top-1 err" in logs, logs[-3000:]
    summary = json.loads((storage / "e2e" / "summary.json").read_text())
    assert summary["val_images"] == 16 and summary["eval_mode"] == "center"

    # One training worker on each node (STRICT_SPREAD over two 2-CPU nodes).
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    workers = cluster.actor_nodes("RayTrainWorker")
    assert len(workers) == 2 and set(workers) == nodes, (workers, nodes)

    # The W&B key the nodes hold never lands in the job's record, its logs, or its files.
    assert FAKE_WANDB_KEY not in json.dumps(cluster.api(f"/api/jobs/{job}"))
    assert FAKE_WANDB_KEY not in logs
    leaks = [p for p in storage.rglob("*") if p.is_file() and FAKE_WANDB_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
