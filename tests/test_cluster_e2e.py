"""A real two-node Ray cluster on this machine, used the way the cluster templates use it.

The head comes from the project's ``.venv/bin/ray start --head`` and a second raylet joins
with ``ray start --address``, both with token authentication on (``RAY_AUTH_MODE=token``, the
token in a file named by ``RAY_AUTH_TOKEN_PATH``), a small object store and the dashboard
bound to loopback. The training job goes in through ``make submit`` with its default runtime
env (``cluster/runtime_env.yaml``: no packages, the nodes already have them) and is followed
with ``make job-logs`` until it ends, as cluster/README.md tells users to do.

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
from localnodes import free_ports, kill_marked, pids_with_env

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MARKER = "RESNET_E2E_CLUSTER"  # set in the nodes' environment only; teardown looks for it
# A recognisable stand-in for a W&B key delivered to the nodes as a secret (40 chars, the
# length of a real key); nothing the job writes or prints may contain it.
FAKE_WANDB_KEY = "e2e0fake0" + uuid.uuid4().hex[:31]


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
        # What the templates give every node: the same, plus the W&B key from a secret. The
        # nodes run as cluster/README's rehearsal starts them, `.venv/bin/ray start` with the
        # venv NOT on PATH: a job's bare `python` would then be the system one (no torch).
        system_path = os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != VENV_BIN.resolve()
        )
        self.node_env = {
            **self.client_env,
            "PATH": system_path,
            MARKER: str(self.root),
            "WANDB_API_KEY": FAKE_WANDB_KEY,
            "WANDB_MODE": "offline",
            "RAY_DEDUP_LOGS": "0",
            # Ray Train's placement-group cleaner asks the state API with no address; Ray then
            # looks for *the* GCS on this host, and with other Ray instances running here (other
            # tests, other users) it dies with "Found multiple active Ray instances". A real
            # node hosts one Ray; here the address is named.
            "RAY_API_SERVER_ADDRESS": self.address,
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
        # -o: this interpreter's venv is the installed project; never re-install it from a test.
        return subprocess.run(
            ["make", "--no-print-directory", "-o", ".venv/.installed", *args],
            cwd=ROOT,
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, config: str, overrides: list[str]) -> str:
        """``make submit`` as a user types it: no RUNTIME_ENV, so the default one."""
        proc = self.make(
            "submit", f"CONFIG={config}", f"ADDRESS={self.address}", "ARGS=" + " ".join(overrides)
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "runtime env: cluster/runtime_env.yaml (no packages" in proc.stdout, proc.stdout
        match = re.search(r"^submitted: (\S+)$", proc.stdout, re.M)
        assert match, proc.stdout
        assert f"make job-logs JOB={match.group(1)}" in proc.stdout
        return match.group(1)

    def follow(self, job_id: str, timeout: float) -> str:
        """``make job-logs`` (it follows by default): returns once the job has ended."""
        try:
            proc = self.make("job-logs", f"JOB={job_id}", f"ADDRESS={self.address}", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.make("job-stop", f"JOB={job_id}", f"ADDRESS={self.address}")
            raise TimeoutError(f"make job-logs still following {job_id} after {timeout}s") from None
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
        kill_marked(f"{MARKER}={self.root}")
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        return pids_with_env(f"{MARKER}={self.root}")


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


def test_trivial_job_spans_both_nodes(cluster, tmp_path):
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
            str(ROOT / "cluster" / "runtime_env.yaml"),
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


def without_overload_warning(log: str) -> str:
    """The log less Ray Train's one transient warning that carries a traceback.

    The controller's first resource request creates the cluster's AutoscalingCoordinator actor
    and waits 5 s for it; on an overloaded machine (this 2-core one under parallel tests) that
    can time out, and Ray logs "Failed to send resource request ... safe to ignore" with the
    GetTimeoutError's traceback, then carries on. Only that block is dropped: any other
    traceback, and this one with a different ending, still fails the test.
    """
    out: list[str] = []
    block: list[str] = []  # the warning's lines so far, kept if it does not end as expected
    prefix = None
    for line in log.splitlines():
        if prefix is None and "Failed to send resource request for train-" in line:
            prefix, block = line.split(")", 1)[0], [line]  # "(TrainController pid=N": its lines only
        elif prefix is not None and line.startswith(prefix) and len(block) < 40:
            block.append(line)
            if "ray.exceptions.GetTimeoutError" in line:
                prefix, block = None, []
        else:
            out += block
            prefix, block = None, []
            out.append(line)
    out += block
    return "\n".join(out)


def test_pipeline_job_trains_on_two_nodes_and_its_log_shows_the_run(cluster, tmp_path):
    data = tmp_path / "synth"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "data", "synth", "--out", str(data), "--classes", "4"]
        + ["--train-per-class", "16", "--val-per-class", "4", "--seed", "0", "--workers", "1"],
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
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "log_every_n_steps=2",
        "cluster.num_workers=2",
        "cluster.use_gpu=false",
        "cluster.cpus_per_worker=1",
        "cluster.placement_strategy=STRICT_SPREAD",
        "eval.final_mode=center",
        "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]
    job = cluster.submit("configs/demo.yaml", overrides)
    followed = cluster.follow(job, timeout=600)
    info = cluster.api(f"/api/jobs/{job}")
    assert info["status"] == "SUCCEEDED", followed[-6000:]

    # What a local run prints, in the followed log: the resolved config, rank 0's step and
    # epoch lines and its final line, then the driver's summary.
    for text in (
        "resolved config:",
        "step 2/8 loss",
        "epoch 1/2 done",
        "epoch 2/2 done",
        "final (center, 16 images): val top-1 err",
        "== summary ==",
    ):
        assert text in followed, (text, followed[-4000:])
    assert (
        followed.index("epoch 1/2 done") < followed.index("epoch 2/2 done") < followed.index("== summary ==")
    )
    # Only rank 0 prints the run's lines.
    assert len(re.findall(r"epoch 1/2 done", followed)) == 1, followed[-4000:]
    # Nothing of Ray's own machinery failing, nor Ray Train's per-report chatter, nor colour codes.
    checked = without_overload_warning(followed)
    for text in ("Traceback", "ModuleNotFoundError", "Reporting training result", "\x1b["):
        assert text not in checked, (text, checked[-6000:])
    summary = json.loads((storage / "e2e" / "summary.json").read_text())
    assert summary["val_images"] == 16 and summary["eval_mode"] == "center" and summary["epochs"] == 2

    # One training worker on each node (STRICT_SPREAD over two 2-CPU nodes).
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    workers = cluster.actor_nodes("RayTrainWorker")
    assert len(workers) == 2 and set(workers) == nodes, (workers, nodes)

    # The W&B key the nodes hold never lands in the job's record, its logs, or its files.
    assert FAKE_WANDB_KEY not in json.dumps(cluster.api(f"/api/jobs/{job}"))
    assert FAKE_WANDB_KEY not in followed
    leaks = [p for p in storage.rglob("*") if p.is_file() and FAKE_WANDB_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_overload_warning_filter_drops_that_block_only():
    warning = [
        "(TrainController pid=7) Failed to send resource request for train-ab12. If this only happens ...",
        "(TrainController pid=7) Traceback (most recent call last):",
        '(TrainController pid=7)   File "ray/_private/worker.py", line 1, in get',
        "(TrainController pid=7) ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
    ]
    other = [
        "(TrainController pid=7) Traceback (most recent call last):",
        "(TrainController pid=7) KeyError: 'x'",
    ]
    assert without_overload_warning("\n".join(["a", *warning, "b"])) == "a\nb"
    # Another traceback after it, or the warning ending otherwise, stays.
    assert "KeyError" in without_overload_warning("\n".join([*warning, *other]))
    cut = "\n".join([*warning[:3], "(RayTrainWorker pid=9) epoch 1/2 done"])
    assert without_overload_warning(cut) == cut
