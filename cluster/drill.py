"""The node-loss drill: a cluster without a shared filesystem on this one machine, rank 0 killed mid-epoch.

    make drill                                      # the demo config, a few epochs
    make drill DRILL_ARGS="--epochs 3 --classes 4 --train-per-class 32 --crop 32 --batch 16"
    .venv/bin/python cluster/drill.py --help

What it builds (as root: mount namespaces need it), all on 127.0.0.1 with random ports and its
own temp dir, so it runs beside other Ray clusters on the machine:

- a local S3 server (moto's server mode) with the bucket ``drill``: the synthetic dataset with
  its index under ``s3://drill/imagenet``, the run under ``s3://drill/runs/<name>``;
- a Ray head started with ``--num-cpus 0`` (the job's driver and Ray Train's controller run
  there, and no training worker can) and two 1-CPU worker nodes, one training worker each;
  every node is ``ray start --block`` in its own mount namespace (``unshare --mount``) with a
  private ``/tmp`` (tmpfs) and empty tmpfs over the checkout's ``data/``, ``runs/`` and
  ``wandb/``, its own ``$HOME``, and token auth on;
- the demo config, shortened, submitted with ``ray job submit --working-dir .`` (no ``pip``
  runtime env: the nodes already run this venv) with the AWS endpoint in its ``env_vars``;
- in an epoch after the first, the node running rank 0 (the ``RayTrainWorker`` whose pid
  prefixes the step lines in the job log) is killed whole: SIGKILL to its ``ray start``,
  raylet and every process carrying that node's marker; once the run goes on with one worker
  fewer (elastic: ``cluster.num_workers=[N-1, N]``) and has trained a few steps so, a new
  worker node joins ``--replace-after`` seconds later, as an autoscaler would start one, and
  the run grows back.

Then one line per check, PASS or FAIL with the figures: the job SUCCEEDED; the run resumed
from a checkpoint; each epoch exactly once in the bucket's ``metrics.jsonl`` and in the W&B
history (every offline ``.wandb`` segment the run keeps under its storage path, in order),
with the same values; ``summary.json`` in the bucket; ``pipeline eval --no-ray`` of the
final checkpoint in the bucket, run in the head's namespace, gives the summary's error; no
training worker ever ran on the head. ``--layout sharded``: the dataset is ``data shard``'s
output under ``s3://drill/imagenet-shards``, served by ``pipeline.bench.s3_latency`` (moto, no
added latency, requests counted), each node fills its own shard cache (its private ``/tmp``)
from the bucket, and one more check reports the data GETs per image and that no node fetched
a shard twice. Exit status: 0 all PASS, 1 a FAIL, 2 the drill itself
could not run. Teardown stops only what the drill started (by pid and by a marker in their
environment), never ``ray stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any checkout: import that checkout's pipeline


from localnodes import free_ports, pids_with_env  # noqa: E402  (cluster/, beside this script)

from pipeline import locations  # noqa: E402

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MARKER = "RESNET_DRILL"  # in every process the drill starts: teardown finds leftovers by it
NODE = "RESNET_DRILL_NODE"  # which node a process belongs to: a node is killed by it
BUCKET = "drill"
HIDDEN = ("data", "runs", "wandb")  # the checkout's folders a node must not see
# A step line of rank 0, as Ray prefixes it in the job log:
# "(RayTrainWorker pid=123, ip=10.0.0.5) epoch 1.25/3 step 10/24 loss ..."
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the prefix on a terminal and in job logs alike
# Rank 0's description of each new worker group: "run drill: ...\n ... world size 3, global batch 16".
WORLD_LINE = re.compile(r"\) run \S+: .*\n.*world size (\d+), global batch (\d+)")
STEP_LINE = re.compile(r"\(RayTrainWorker pid=(\d+)[^)]*\) epoch (\d+)\.(\d\d)/(\d+) step (\d+)/(\d+)")

# Runs inside the new mount namespace, then becomes `ray start`.
NODE_SCRIPT = r"""
set -e
IFS=:
# A checkout (or its venv) that itself lives under /tmp must stay visible under the private /tmp:
# hold it elsewhere, mount the tmpfs, then put it back at the same path.
hold=$(mktemp -d "$DRILL_HOLD/node.XXXXXX")
i=0; for d in $DRILL_KEEP; do mkdir -p "$hold/$i"; mount --bind "$d" "$hold/$i"; i=$((i+1)); done
mount -t tmpfs -o size=4g,mode=1777 drill-tmp /tmp
i=0; for d in $DRILL_KEEP; do mkdir -p "$d"; mount --bind "$hold/$i" "$d"; i=$((i+1)); done
for d in $DRILL_HIDE; do [ -d "$d" ] && mount -t tmpfs -o size=1m,mode=0755 drill-hidden "$d"; done
unset IFS
mkdir -p "$HOME"
exec "$@"
"""


class DrillError(RuntimeError):
    """The drill itself cannot go on (a node does not start, the job cannot be submitted)."""


def descendants(pids: set[int]) -> set[int]:
    """``pids`` and all their children, grandchildren, ... (from /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Check:
    """The report: one PASS/FAIL line per check."""

    def __init__(self) -> None:
        self.lines: list[tuple[bool, str, str]] = []

    def __call__(self, ok: bool, what: str, detail: str) -> bool:
        self.lines.append((bool(ok), what, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}", flush=True)
        return bool(ok)

    @property
    def failed(self) -> int:
        return sum(not ok for ok, _, _ in self.lines)


class Drill:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # Short path: Ray puts unix sockets under a node's temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="drill-", dir="/tmp"))
        # Outside /tmp: where a node holds the checkout while its private /tmp is mounted.
        self.hold = Path(tempfile.mkdtemp(prefix="drill-hold-", dir="/var/tmp"))
        self.token = secrets.token_hex(32)
        (self.gcs_port, self.dashboard_port, self.client_port, self.s3_port, *self._spare) = free_ports(40)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.aws = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "drill",
            "AWS_SECRET_ACCESS_KEY": "drill",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on a laptop
        }
        scrub = ("RAY_", "WANDB_", "AWS_")
        base = {k: v for k, v in os.environ.items() if not k.startswith(scrub) and k != "PYTHONPATH"}
        base["PATH"] = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])
        base[MARKER] = str(self.root)
        self.client_env = {
            **base,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.nodes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()
        self.moto: subprocess.Popen | None = None
        self.run_uri = f"s3://{BUCKET}/runs/{args.name}"
        self.sharded = args.layout == "sharded"
        self.data_uri = f"s3://{BUCKET}/imagenet-shards" if self.sharded else f"s3://{BUCKET}/imagenet"
        self.job_id = f"drill-{secrets.token_hex(4)}"

    # ------------------------------------------------------------ object store and dataset

    def start_s3(self) -> None:
        log = open(self.root / "s3.log", "w")
        self.moto = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.bench.s3_latency",
                "--latency-ms",
                "0",
                "--port",
                str(self.s3_port),
            ]
            if self.sharded  # the same moto, its requests counted (check_shard_gets)
            else [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
            env=self.client_env,
            cwd=ROOT,  # `python -m pipeline...` from this checkout
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        os.environ.update(self.aws)  # this process's pyarrow clients (upload, checks)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if self.moto.poll() is not None or time.monotonic() > deadline:
                    raise DrillError(
                        f"the S3 server did not start:\n{(self.root / 's3.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.3)
        import pyarrow.fs

        fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
        fs.create_dir(BUCKET)

    def upload_dataset(self) -> None:
        a = self.args
        local = self.root / "synth"
        self._pipeline(
            "data", "synth", "--out", str(local), "--classes", str(a.classes),
            "--train-per-class", str(a.train_per_class), "--val-per-class", str(a.val_per_class),
            "--seed", "0", "--workers", "1",
        )  # fmt: skip
        import pyarrow.fs

        fs, path = locations.filesystem(self.data_uri)
        if self.sharded:
            shards = self.root / "shards"
            print(
                self._pipeline("data", "shard", str(local), str(shards), "--shard-size-mb", "1").strip(),
                flush=True,
            )
            pyarrow.fs.copy_files(str(shards), path, destination_filesystem=fs)
            return
        pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)
        print(self._pipeline("data", "index", self.data_uri).strip(), flush=True)

    def _pipeline(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=ROOT,
            env={**self.client_env, **self.aws},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise DrillError(
                f"python -m pipeline {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
            )
        return proc.stdout

    # ------------------------------------------------------------ nodes

    def _port(self) -> str:
        return str(self._spare.pop())

    def start_node(self, name: str, head: bool = False) -> None:
        """``ray start --block`` in a new mount namespace; returns once the node is up."""
        env = {
            **self.client_env,
            NODE: f"{self.root}:{name}",
            "HOME": "/tmp/home",  # inside the private /tmp: nothing of the host's home
            "RAY_DEDUP_LOGS": "0",
            # The GCS declares a silent node dead after period x threshold (Ray's defaults: 3 s x 5,
            # plus timeouts): a few seconds here, so the run shrinks before the replacement comes.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "DRILL_HIDE": ":".join(str(ROOT / d) for d in HIDDEN),
            "DRILL_HOLD": str(self.hold),
            "DRILL_KEEP": ":".join(str(p) for p in {ROOT, Path(sys.prefix)} if Path("/tmp") in p.parents),
        }
        ray = [
            RAY, "start", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1",
            "--temp-dir", "/tmp/ray",
            "--object-store-memory", str(100 * 1024**2),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--node-manager-port", self._port(), "--object-manager-port", self._port(),
            "--dashboard-agent-listen-port", self._port(), "--dashboard-agent-grpc-port", self._port(),
            "--runtime-env-agent-port", self._port(), "--metrics-export-port", self._port(),
            "--resources", json.dumps({f"drill_{name}": 1}),
        ]  # fmt: skip
        if head:
            ray += [
                "--head", "--num-cpus", "0", "--port", str(self.gcs_port),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(self.client_port),
            ]  # fmt: skip
        else:
            ray += ["--num-cpus", "1", "--address", f"127.0.0.1:{self.gcs_port}"]
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", NODE_SCRIPT, name, *ray]
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, cwd="/", stdout=log, stderr=subprocess.STDOUT)
        self.nodes[name] = proc
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in self.node_log(name):
            if proc.poll() is not None:
                raise DrillError(
                    f"ray start ({name}) exited {proc.returncode}:\n{self.node_log(name)[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise DrillError(f"ray start ({name}) not up after 180 s:\n{self.node_log(name)[-3000:]}")
            time.sleep(0.5)

    def node_log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_pids(self, name: str) -> list[int]:
        """Every process of a node: those with its marker in their environment, and every
        descendant of those and of its ``ray start`` (Ray's dashboard modules and agents
        rewrite their environment block for their process titles, so the marker alone misses them)."""
        roots = set(pids_with_env(f"{NODE}={self.root}:{name}"))
        proc = self.nodes.get(name)
        if proc is not None and proc.poll() is None:
            roots.add(proc.pid)
        return sorted(descendants(roots))

    def kill_node(self, name: str) -> list[str]:
        """SIGKILL every process of the node until none is left; returns their names."""
        killed: dict[int, str] = {}
        deadline = time.monotonic() + 20
        while (pids := self.node_pids(name)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    killed.setdefault(pid, Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
            kill_all(pids)  # a second pass catches what was being forked during the first
            time.sleep(0.2)
        self.nodes[name].wait(timeout=10)
        self.killed.add(name)
        if self.node_pids(name):
            raise DrillError(f"processes of node {name} survived SIGKILL: {self.node_pids(name)}")
        return sorted(killed.values())

    def wait_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) < count:
            if time.monotonic() > deadline:
                raise DrillError(f"{count} nodes expected, alive: {len(self.alive_nodes())}")
            time.sleep(1)

    def isolation(self) -> tuple[bool, str]:
        """What a node sees: its own /tmp, and empty data/, runs/, wandb/ of the checkout."""
        problems, seen = [], 0
        for name, proc in self.nodes.items():
            if proc.poll() is not None:
                continue
            view = Path(f"/proc/{proc.pid}/root")
            seen += 1
            if (view / self.root.relative_to("/")).exists():
                problems.append(f"{name} sees the host's /tmp")
            for d in HIDDEN:
                inside = view / (ROOT / d).relative_to("/")
                if inside.is_dir() and any(inside.iterdir()):
                    problems.append(f"{name} sees {ROOT / d}")
        return not problems and seen > 0, "; ".join(
            problems
        ) or f"{seen} nodes: private /tmp, no {'/, '.join(HIDDEN)}/"

    # ------------------------------------------------------------ the dashboard's HTTP API

    def api(self, path: str) -> Any:
        request = urllib.request.Request(self.address + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        try:
            nodes = self.api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        except OSError:
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def job_logs(self) -> str:
        try:
            return self.api(f"/api/jobs/{self.job_id}/logs")["logs"]
        except OSError:
            return ""

    def job_status(self) -> str:
        return self.api(f"/api/jobs/{self.job_id}")["status"]

    # ------------------------------------------------------------ the job

    def overrides(self) -> list[str]:
        a = self.args
        sizes = []
        if a.crop != 64:  # the demo's 64 / [73, 137] / 73, scaled alike
            s = a.crop / 64
            sizes = [
                f"data.crop_size={a.crop}",
                f"data.scale_min={round(73 * s)}",
                f"data.scale_max={round(137 * s)}",
                f"data.val_resize={round(73 * s)}",
            ]
        return [
            f"name={a.name}",
            f"data.root={self.data_uri}",
            f"checkpoint.storage_path=s3://{BUCKET}/runs",
            f"model.name={a.model}",
            f"model.num_classes={a.classes}",
            f"optim.batch_size={a.batch}",
            f"schedule.epochs={a.epochs}",
            # Elastic: [workers - 1, workers], so losing a node shrinks the run and the replacement
            # grows it back (Ray Train checks for room every resize_check_s).
            f"cluster.num_workers=[{a.workers - 1},{a.workers}]",
            f"cluster.resize_check_s={a.resize_check}",
            # After a node is lost, Ray Train first asks again for all workers (its view of the
            # cluster lags); this bounds that wait, after which it starts with the workers that fit.
            f"cluster.start_timeout_s={a.start_timeout}",
            "cluster.cpus_per_worker=1",
            "cluster.use_gpu=false",
            f"cluster.max_failures={a.max_failures}",
            "tracking.mode=offline",
            "log_every_n_steps=1",
            *sizes,
        ]

    def submit(self) -> None:
        # Only env vars: the code goes as the working dir (Ray leaves out what .gitignore does,
        # and .git/ and .venv/), and the nodes already run this venv (a `pip:` env would clone it).
        spec = {
            "env_vars": {
                **self.aws,
                "PYTHONUNBUFFERED": "1",
                "RAY_DEDUP_LOGS": "0",
                "WANDB_MODE": "offline",
                "WANDB_SILENT": "true",
            }
        }
        cmd = [
            RAY, "job", "submit", "--address", self.address, "--submission-id", self.job_id,
            "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(spec), "--no-wait",
            "--", "python", "-m", "pipeline", "train", "--config", self.args.config, *self.overrides(),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=self.client_env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise DrillError(f"ray job submit failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")

    def kill_rank0_mid_epoch(self, timeout: float) -> dict[str, Any] | None:
        """Wait for a step line inside an epoch after the first, once the checkpoint of the epoch
        before is whole in the bucket (its upload runs in the background); kill that worker's node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in STEP_LINE.finditer(ANSI.sub("", self.job_logs())):
                pid, whole, frac, epochs = int(m[1]), int(m[2]), int(m[3]), int(m[4])
                if whole >= 1 and 0 < frac <= self.args.kill_before and whole < epochs:
                    saved = locations.join(self.run_uri, f"checkpoint_epoch{whole:04d}", "state.pt")
                    if locations.kind(saved) != "file":
                        continue
                    node = env_of(pid).get(NODE, "").rsplit(":", 1)[-1]
                    if node not in self.nodes or node in self.killed:
                        continue  # a line of an earlier worker group, or a pid already gone
                    names = self.kill_node(node)
                    return {"node": node, "pid": pid, "at": f"{whole}.{frac:02d}", "processes": names}
            if self.job_status() in {"SUCCEEDED", "FAILED", "STOPPED"}:
                return None
            time.sleep(0.3)
        return None

    def wait_for_group(self, size: int, timeout: float, steps: int = 3) -> bool:
        """Until the job log shows a new worker group of ``size`` that has printed ``steps`` step lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = ANSI.sub("", self.job_logs())
            starts = [(m.start(), int(m[1])) for m in WORLD_LINE.finditer(logs)]
            if (
                len(starts) > 1
                and starts[-1][1] == size
                and len(STEP_LINE.findall(logs[starts[-1][0] :])) >= steps
            ):
                return True
            if self.job_status() in {"SUCCEEDED", "FAILED", "STOPPED"}:
                return False
            time.sleep(1)
        return False

    def wait_job(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.job_status()) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
            if time.monotonic() > deadline:
                return f"{status} after {timeout:.0f} s"
            time.sleep(2)
        return status

    def train_worker_nodes(self) -> list[str]:
        query = (
            "/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D"
            "&filter_values=RayTrainWorker"
        )
        return [a["node_id"] for a in self.api(query)["data"]["result"]["result"]]

    # ------------------------------------------------------------ teardown

    def copy_node_logs(self) -> None:
        """Ray's own logs live in each node's private /tmp: copy them out while it lives."""
        for name, proc in self.nodes.items():
            view = Path(f"/proc/{proc.pid}/root")
            latest = view / "tmp/ray/session_latest"
            try:  # an absolute link, meant for the node's own root
                src = view / os.readlink(latest).lstrip("/") / "logs"
            except OSError:
                continue
            if proc.poll() is None and src.is_dir():
                shutil.copytree(
                    src, self.root / "nodes" / name, dirs_exist_ok=True, ignore_dangling_symlinks=True
                )

    def stop(self, keep: bool) -> None:
        # All nodes at once (one by one, `ray start --block` takes up to ~30 s each to wind down).
        live = [proc for proc in self.nodes.values() if proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name, proc in self.nodes.items():
            kill_all(self.node_pids(name))
            proc.wait(timeout=10)
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            self.moto.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (
            left := sorted(descendants(set(pids_with_env(f"{MARKER}={self.root}"))))
        ) and time.monotonic() < deadline:
            kill_all(left)
            time.sleep(0.5)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.hold, ignore_errors=True)  # empty folders: the mounts died with the nodes


# ---------------------------------------------------------------- the checks


def _read_json_lines(uri: str) -> list[dict] | None:
    raw = locations.read_bytes(uri)
    return None if raw is None else [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def _wandb_epoch_rows(drill: Drill) -> tuple[list[str], list[dict]]:
    """What a user gets from ``pipeline wandb-sync RUN``: the run's offline segments in the bucket
    merged (on this machine, from the bucket alone; uploaded nowhere). Returns (its report line,
    if any; the merged history's epoch rows)."""
    from pipeline.wandb_offline import read_wandb_history

    out = drill.root / "wandb-merged"
    cmd = [sys.executable, "-m", "pipeline", "wandb-sync", drill.run_uri, "--dry-run", "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**drill.client_env, **drill.aws}, capture_output=True, text=True, timeout=600
    )
    merged = [line for line in proc.stdout.splitlines() if line.startswith("merged ")]
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb")) if proc.returncode == 0 else []
    if not files:
        return [
            f"wandb-sync exit {proc.returncode}: {(proc.stderr.strip() or proc.stdout.strip())[-400:]}"
        ], []
    rows = [row for row in read_wandb_history(files[0]) if "train/loss" in row]  # epoch rows, not step rows
    return merged, rows


def _eval_in_head(drill: Drill, checkpoint: str, mode: str) -> tuple[dict | None, str]:
    """``pipeline eval --no-ray`` of ``checkpoint``, run in the head node's mount namespace."""
    cmd = [
        "nsenter", "--target", str(drill.nodes["head"].pid), "--mount", f"--wd={ROOT}", "--",
        sys.executable, "-m", "pipeline", "eval", "--config", drill.args.config, "--no-ray",
        "--checkpoint", checkpoint, "--out", "/tmp/drill-eval.json", *drill.overrides(), f"eval.mode={mode}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**drill.client_env, **drill.aws}, capture_output=True, text=True, timeout=600
    )
    record = eval_record(proc.stdout) if proc.returncode == 0 else None
    if record is None:
        return None, f"exit {proc.returncode}: {(proc.stderr.strip() or proc.stdout.strip())[-600:]}"
    return record, ""


def eval_record(stdout: str) -> dict | None:
    """The result ``pipeline eval`` prints: the last JSON object in its output (indented, on its own lines)."""
    lines = stdout.splitlines()
    ends = [i for i, line in enumerate(lines) if line == "}"]
    if not ends:
        return None
    starts = [i for i, line in enumerate(lines[: ends[-1]]) if line == "{"]
    if not starts:
        return None
    try:
        return json.loads("\n".join(lines[starts[-1] : ends[-1] + 1]))
    except ValueError:
        return None


def check_kill(
    drill: Drill, check: Check, logs: str, kill: dict | None, replaced_after: float | None
) -> None:
    if kill is None:
        check(
            False,
            "rank 0 killed mid-epoch",
            "no step line of rank 0 inside an epoch after the first was seen",
        )
        return
    check(
        True,
        "rank 0 killed mid-epoch",
        f"node {kill['node']} (RayTrainWorker pid {kill['pid']}) at epoch {kill['at']}/{drill.args.epochs}, "
        f"{len(kill['processes'])} processes SIGKILLed ({', '.join(kill['processes'])}); "
        f"a new node up {replaced_after:.1f} s later",
    )
    after = logs[logs.find(f"epoch {kill['at']}/") :]
    restored = re.findall(r"restored from checkpoint (\S+): epoch (\d+), step (\d+)", after)
    check(
        bool(restored),
        "resumed from a checkpoint",
        f"epoch {restored[-1][1]}, step {restored[-1][2]} ({restored[-1][0]})"
        if restored
        else "no 'restored from checkpoint' line after the kill: the new worker group started from scratch",
    )


def check_metrics(drill: Drill, check: Check) -> list[dict]:
    want = list(range(1, drill.args.epochs + 1))
    uri = locations.join(drill.run_uri, "metrics.jsonl")
    records = _read_json_lines(uri)
    if records is None:
        check(False, "metrics.jsonl epochs", f"{uri} does not exist")
        return []
    got = [r.get("epoch") for r in records]
    check(got == want, "metrics.jsonl epochs", f"{got} in {uri} (want {want})")
    return records


def check_wandb(drill: Drill, check: Check, records: list[dict]) -> None:
    want = list(range(1, drill.args.epochs + 1))
    merged, rows = _wandb_epoch_rows(drill)
    got = [r.get("epoch") for r in rows]
    where = "; ".join(merged) or "no merged run"
    check(bool(rows) and got == want, "W&B history epochs", f"{got} (want {want}); {where}")
    by_epoch = {r.get("epoch"): r for r in records}
    diffs = [
        f"epoch {r['epoch']} {k}: W&B {r[k]} vs metrics.jsonl {by_epoch[r['epoch']].get(k)}"
        for r in rows
        if r.get("epoch") in by_epoch
        for k in ("train/loss", "val/top1_err")
        if k in r and r[k] != by_epoch[r["epoch"]].get(k)
    ]
    compared = (
        f"train/loss and val/top1_err of {len(rows)} epoch rows" if rows else "no epoch rows to compare"
    )
    check(bool(rows) and not diffs, "W&B values = metrics.jsonl", "; ".join(diffs[:4]) or compared)


def check_summary(drill: Drill, check: Check) -> dict | None:
    uri = locations.join(drill.run_uri, "summary.json")
    raw = locations.read_bytes(uri)
    if raw is None:
        check(False, "summary.json", f"{uri} does not exist")
        return None
    s = json.loads(raw)
    check(
        s.get("epochs") == drill.args.epochs,
        "summary.json",
        f"{uri}: epochs {s.get('epochs')}, {s.get('eval_mode')} top-1 err {s.get('val_top1_err')}, "
        f"checkpoint {s.get('checkpoint')}",
    )
    return s


def check_eval(drill: Drill, check: Check, summary: dict | None) -> None:
    what = "eval of the final checkpoint"
    if not summary or not summary.get("checkpoint"):
        check(False, what, "no final checkpoint named in summary.json")
        return
    ckpt = summary["checkpoint"]
    in_bucket = ckpt.startswith(drill.run_uri + "/") and locations.kind(ckpt) == "dir"
    record, error = _eval_in_head(drill, ckpt, summary["eval_mode"])
    if record is None:
        check(False, what, f"{ckpt}: `pipeline eval --no-ray` in the head's namespace failed: {error}")
        return
    same = (
        abs(record["top1_err"] - summary["val_top1_err"]) < 1e-9 and record["images"] == summary["val_images"]
    )
    check(
        in_bucket and same,
        what,
        f"{ckpt} {'in' if in_bucket else 'NOT in'} the bucket; eval top-1 err {record['top1_err']} on "
        f"{record['images']} images vs summary {summary['val_top1_err']} on {summary['val_images']}",
    )


def check_placement(drill: Drill, check: Check) -> None:
    head = [n["node_id"] for n in drill.alive_nodes() if n.get("is_head_node")]
    workers = drill.train_worker_nodes()
    on_head = sum(w in head for w in workers)
    check(
        bool(workers) and bool(head) and on_head == 0,
        "training placement",
        f"{len(workers)} RayTrainWorker actors on {len(set(workers))} worker nodes, {on_head} on the head",
    )


def check_elastic(drill: Drill, check: Check, logs: str, records: list[dict]) -> None:
    """The run went on with one worker fewer after the kill (and trained there), then grew back."""
    n = drill.args.workers
    starts = [(m.start(), int(m[1])) for m in WORLD_LINE.finditer(logs)]
    sizes = [size for _, size in starts]
    # Steps trained by each worker group: the step lines between its start line and the next one.
    bounds = [pos for pos, _ in starts] + [len(logs)]
    trained = [len(STEP_LINE.findall(logs[a:b])) for a, b in zip(bounds, bounds[1:], strict=False)]
    shrank = [i for i, size in enumerate(sizes) if size == n - 1 and trained[i] > 0]
    grew = bool(shrank) and any(size == n for size in sizes[shrank[0] + 1 :])
    batches = {r.get("global_batch") for r in records}
    detail = (
        f"worker groups of {sizes} (steps trained by each: {trained}); epoch records' world sizes "
        f"{[r.get('world_size') for r in records]}, global batch {sorted(batches, key=str)}"
    )
    ok = sizes[:1] == [n] and bool(shrank) and grew and batches == {drill.args.batch}
    check(ok, "elastic shrink and growth", detail)


def run_checks(
    drill: Drill, check: Check, status: str, kill: dict | None, replaced_after: float | None
) -> None:
    """Every check, each on its own: one that cannot even run is a FAIL with its error."""
    logs = ANSI.sub("", drill.job_logs())
    (drill.root / "job.log").write_text(logs)

    def guarded(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # a check that crashes is a miss, reported like the others
            check(False, what, f"the check failed: {type(e).__name__}: {e}")
            return None

    check(status == "SUCCEEDED", "job", f"{status} (job {drill.job_id})")
    guarded("rank 0 killed mid-epoch", check_kill, drill, check, logs, kill, replaced_after)
    records = guarded("metrics.jsonl epochs", check_metrics, drill, check)
    guarded("W&B history epochs", check_wandb, drill, check, records or [])
    summary = guarded("summary.json", check_summary, drill, check)
    guarded("eval of the final checkpoint", check_eval, drill, check, summary)
    guarded("training placement", check_placement, drill, check)
    guarded("elastic shrink and growth", check_elastic, drill, check, logs, records or [])
    if drill.sharded:
        guarded("shard GETs", check_shard_gets, drill, check)


def check_shard_gets(drill: Drill, check: Check) -> None:
    """Sharded layout: every node (workers, the replacement, the head's eval) fetched each shard at most once."""
    from pipeline.data.shards import load_manifest

    with urllib.request.urlopen(f"{drill.endpoint}/__latency/counts", timeout=10) as r:
        counts = json.loads(r.read())
    m = load_manifest(drill.data_uri)
    images = len(m.split("train")) + len(m.split("val"))
    nodes = drill.args.workers + 2
    gets = counts.get("GET.tar", 0)
    check(gets <= len(m.shards) * nodes, "shard GETs",
          f"{gets} shard GETs for {len(m.shards)} shards and {nodes} nodes: {gets / images:.3f} GETs per image "
          f"over the run ({images} images, {drill.args.epochs} epochs)")  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cluster/drill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="config inside this checkout")
    p.add_argument("--name", default="drill", help="run name (the folder under s3://drill/runs/)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="global batch (split over the workers)")
    p.add_argument(
        "--workers", type=int, default=3, help="worker nodes (1 CPU each); the run is elastic on [N-1, N]"
    )
    p.add_argument(
        "--resize-check", type=float, default=5.0, help="cluster.resize_check_s (Ray's default is 60)"
    )
    p.add_argument("--start-timeout", type=float, default=15.0, help="cluster.start_timeout_s")
    p.add_argument(
        "--model", default="resnet18", help="model.name (the demo's; cifar_resnet20 for small checkpoints)"
    )
    p.add_argument("--crop", type=int, default=64, help="training crop; the scales follow the demo's ratios")
    p.add_argument("--max-failures", type=int, default=3, help="cluster.max_failures")
    p.add_argument("--layout", choices=["folder", "sharded"], default="folder",
                   help="the dataset in the bucket: the folder tree + index, or `data shard`'s shards")  # fmt: skip
    p.add_argument(
        "--kill-before", type=int, default=75, help="kill at a step line below this %% of an epoch"
    )
    p.add_argument(
        "--replace-after",
        type=float,
        default=5.0,
        help="seconds from the run training on N-1 workers to the new node",
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds the job may take")
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir (logs, W&B segments) even on success"
    )
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error("--workers must be at least 2: the run goes on with one fewer")
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the kill happens in an epoch after the first")
    if (args.classes * args.train_per_class) // args.batch < 2:
        p.error("fewer than 2 steps per epoch: raise --train-per-class or lower --batch")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        print("error: the drill needs root and util-linux's unshare and nsenter (one mount namespace per node)",
              file=sys.stderr)  # fmt: skip
        return 2
    drill, check, start = Drill(args), Check(), time.monotonic()

    def say(message: str) -> None:
        print(f"== [{time.monotonic() - start:4.0f} s] {message}", flush=True)

    say(f"drill in {drill.root}")
    status = "not run"
    try:
        drill.start_s3()
        say(f"S3 server at {drill.endpoint}; uploading the dataset to {drill.data_uri}")
        drill.upload_dataset()
        drill.start_node("head", head=True)
        for i in range(args.workers):
            drill.start_node(f"worker{i + 1}")
        drill.wait_nodes(args.workers + 1)
        say(f"Ray head and {args.workers} worker nodes up, dashboard {drill.address}")
        ok, detail = drill.isolation()
        check(ok, "node isolation", detail)
        drill.submit()
        say(f"submitted job {drill.job_id}")
        kill = drill.kill_rank0_mid_epoch(args.timeout)
        replaced_after = None
        if kill is not None:
            say(f"killed node {kill['node']} at epoch {kill['at']}; waiting for the run to go on with fewer")
            killed_at = time.monotonic()
            shrunk = drill.wait_for_group(args.workers - 1, timeout=180)
            say(
                f"training on {args.workers - 1} workers" if shrunk else "the run did not shrink within 180 s"
            )
            time.sleep(args.replace_after)
            drill.start_node(f"worker{args.workers + 1}")
            replaced_after = time.monotonic() - killed_at
        status = drill.wait_job(args.timeout)
        say(f"job {drill.job_id}: {status}; checking")
        run_checks(drill, check, status, kill, replaced_after)
    except DrillError as e:
        print(f"error: the drill could not run: {e}", file=sys.stderr)
        check.lines.append((False, "drill", str(e)))
        code = 2
    else:
        code = 1 if check.failed else 0
    finally:
        keep = args.keep or bool(check.failed) or not check.lines
        if keep:
            drill.copy_node_logs()
            (drill.root / "job.log").write_text(ANSI.sub("", drill.job_logs()) if drill.nodes else "")
        drill.stop(keep=keep)
    say(f"{len(check.lines) - check.failed}/{len(check.lines)} checks passed" +
          (f"; logs kept in {drill.root} (job.log, <node>.log, nodes/, wandb-segments/)" if keep else ""))  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
