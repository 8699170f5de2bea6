"""A real two-node Ray cluster on this machine, used the way the cluster templates use it.

The head comes from the project's ``.venv/bin/ray start --head`` and a second raylet joins
with ``ray start --address``, both with token authentication on (``RAY_AUTH_MODE=token``, the
token in a file named by ``RAY_AUTH_TOKEN_PATH``), a small object store and the dashboard
bound to loopback. The training job goes in through ``make submit`` with its default runtime
env (``cluster/runtime_env.yaml``: no packages, the nodes already have them) and is followed
with ``make job-logs`` until it ends, as cluster/README.md tells users to do.

The nodes come from cluster/localnodes.py (the drill's harness too): each with its own temp
dir, its own ports (all random) and a custom resource naming it, so the two raylets share the
host without touching any other Ray running here, and the venv NOT on their PATH (as
cluster/README's rehearsal starts them). Teardown stops only the processes started here
(by a marker in their environment); it never runs ``ray stop``.

    .venv/bin/python -m pytest -q tests/test_cluster_e2e.py
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from localnodes import RAY, LocalNodes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# A recognisable stand-in for a W&B key delivered to the nodes as a secret (40 chars, the
# length of a real key); nothing the job writes or prints may contain it.
FAKE_WANDB_KEY = "e2e0fake0" + uuid.uuid4().hex[:31]
BUCKET = "e2e"


class Cluster(LocalNodes):
    """The head and one joined node (2 CPUs each), driven through the Makefile as a user does."""

    def __init__(self) -> None:
        # What the templates give every node: the W&B key from a secret. The nodes run as
        # cluster/README's rehearsal starts them, `.venv/bin/ray start` with the venv NOT on PATH
        # (the harness's default): a job's bare `python` would then be the system one (no torch).
        super().__init__("e2e", env={"WANDB_API_KEY": FAKE_WANDB_KEY, "WANDB_MODE": "offline"})

    def up(self) -> Cluster:
        # A bucket for the sharded dataset; the nodes get its endpoint and keys as the templates'
        # nodes get theirs (from the instance's role), not through the job.
        self.aws = self.start_s3(BUCKET)
        self.node_env.update(self.aws)
        self.start("head", head=True, num_cpus=2)
        self.start("worker", num_cpus=2)
        self.wait_alive({"head", "worker"})
        return self

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


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    c = Cluster()
    try:
        yield c.up()
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
            "sh",
            "cluster/scripts/job_python.sh",  # the raylet's Python: the venv is not on the nodes' PATH
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


def test_make_submit_trains_on_sharded_imagenet_in_a_bucket(cluster, tmp_path, monkeypatch):
    """``data shard``'s output in a bucket as ``data.root``, through ``make submit``: the job
    knows the layout by its manifest, the shards come into the nodes' cache once each, and the
    run trains, evaluates and writes its summary."""
    import pyarrow.fs

    from pipeline.data.cache_shards import SHARDS_FOLDER
    from pipeline.data.shard_manifest import load_manifest
    from pipeline.store import locations

    for key, value in cluster.aws.items():
        monkeypatch.setenv(key, value)
    synth, shards, uri = tmp_path / "synth", tmp_path / "shards", f"s3://{BUCKET}/imagenet-shards"
    for args in (
        ["data", "synth", "--out", str(synth), "--classes", "4", "--train-per-class", "16"]
        + ["--val-per-class", "4", "--seed", "0", "--workers", "1"],
        ["data", "shard", str(synth), str(shards), "--shard-size-mb", "1"],
    ):
        subprocess.run(
            [sys.executable, "-m", "pipeline", *args], cwd=ROOT, check=True, capture_output=True, timeout=300
        )
    fs, path = locations.filesystem(uri)
    pyarrow.fs.copy_files(str(shards), path, destination_filesystem=fs)
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    overrides = [
        "name=e2e-shards", f"data.root={uri}", f"data.cache_dir={cache}", "model.name=cifar_resnet20",
        "model.num_classes=4", "data.crop_size=32", "data.scale_min=36", "data.scale_max=48",
        "data.val_resize=36", "optim.batch_size=16", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "cluster.num_workers=2", "cluster.use_gpu=false", "cluster.cpus_per_worker=1",
        "cluster.placement_strategy=STRICT_SPREAD", "eval.final_mode=center", "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]  # fmt: skip
    job = cluster.submit("configs/demo.yaml", overrides)
    followed = cluster.follow(job, timeout=600)
    assert cluster.api(f"/api/jobs/{job}")["status"] == "SUCCEEDED", followed[-6000:]
    summary = json.loads((storage / "e2e-shards" / "summary.json").read_text())
    assert (summary["epochs"], summary["val_images"], summary["eval_mode"]) == (1, 16, "center"), summary
    manifest = load_manifest(uri)
    cached = sorted(p.name for p in (cache / SHARDS_FOLDER).glob("*.ok"))  # shards named by content
    assert len(cached) == len({s.sha256 for s in manifest.shards}), (
        cached,
        [s.name for s in manifest.shards],
    )
