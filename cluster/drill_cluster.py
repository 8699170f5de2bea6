"""The drill's cluster on this one machine and what happens to its job: the local S3 server and
the dataset in it, the Ray nodes (cluster/localnodes.py, each in its own mount namespace), the
job submitted as ``make submit`` does it, rank 0's node killed mid-epoch, the job stopped or its
head lost and the job submitted again. cluster/drill.py runs these in order; cluster/drill_checks.py
reads the run's records afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from typing import Any

from dashboard_client import JOB_ENDED
from localnodes import CHECKOUT, RAY, LocalNodes

from pipeline.store import locations
from pipeline.store.rundir import RunDir

BUCKET = "drill"
HIDDEN = ("data", "runs", "wandb")  # the checkout's folders a node must not see
# The GCS declares a silent node dead after period x threshold (Ray's defaults: 3 s x 5, plus
# timeouts): a few seconds here, so the run shrinks before the replacement comes.
HEALTH = {
    f"RAY_health_check_{k}": v
    for k, v in [("period_ms", "1000"), ("timeout_ms", "1000"), ("failure_threshold", "3")]
}


# What rank 0 prints when it restores a checkpoint, and its step lines (pipeline/train/).
RESTORED = re.compile(r"restored from checkpoint \S+: epoch (\d+), step \d+")
STEP_LINE = re.compile(r"\bepoch [\d.]+/\d+ step \d+/\d+ ")  # after Ray's "(RayTrainWorker pid=N) "


class DrillError(RuntimeError):
    """The drill itself cannot go on (the S3 server does not start, a command fails)."""


class Drill:
    """The drill's cluster, bucket and job, and what it does to them; ``args`` are the command's."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.nodes = LocalNodes("drill", env=HEALTH)
        self.root = self.nodes.root
        self.aws: dict[str, str] = {}
        self.env = self.nodes.client_env
        self.run_uri = f"s3://{BUCKET}/runs/{args.name}"
        self.run = RunDir(self.run_uri)
        self.sharded = args.layout == "sharded"
        self.data_uri = f"s3://{BUCKET}/imagenet" + ("-shards" if self.sharded else "")
        self.job_ids = [f"drill-{secrets.token_hex(4)}"]  # one more per resubmission
        self.head = "head"  # the node name of the head now (a lost head's successor has another)
        self.hidden = [CHECKOUT / d for d in HIDDEN]  # empty in every node's view
        self.lost_groups: list[int] = []  # the sizes of the worker groups a lost head knew of

    @property
    def job_id(self) -> str:
        """The job submitted last."""
        return self.job_ids[-1]

    # ------------------------------------------------------------ object store, dataset, commands

    def start_s3(self) -> None:
        from pipeline.bench.s3_latency import Faults

        # --faults: the shards' GETs (.tar) fail as asked, the manifest's and the uploads do not.
        faults = Faults(**self.args.faults, suffix=".tar").to_args() if self.args.faults else []
        self.aws = self.nodes.start_s3(BUCKET, counted=self.sharded, faults=tuple(faults))
        self.env = {**self.nodes.client_env, **self.aws}  # the drill's own commands
        os.environ.update(self.aws)  # this process's pyarrow clients (upload, checks)

    def upload_dataset(self) -> None:
        import pyarrow.fs

        a, local = self.args, self.root / "synth"
        self.pipeline("data", "synth", "--out", str(local), "--classes", str(a.classes), "--seed", "0", "--workers",
                      "1", "--train-per-class", str(a.train_per_class), "--val-per-class", str(a.val_per_class))  # fmt: skip
        fs, path = locations.filesystem(self.data_uri)
        if self.sharded:  # 1 MB shards: a few dozen of them, so each node fetches many
            self.pipeline("data", "shard", str(local), str(self.root / "shards"), "--shard-size-mb", "1")
            return pyarrow.fs.copy_files(str(self.root / "shards"), path, destination_filesystem=fs)
        pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)
        self.pipeline("data", "index", self.data_uri)

    def pipeline(self, *args: str, in_head: bool = False) -> None:
        """``python -m pipeline ARGS`` from this checkout (``in_head``: in the head's mount namespace)."""
        cmd = [sys.executable, "-m", "pipeline", *args]
        cmd = self.nodes.in_namespace(self.head, cmd, cwd=CHECKOUT) if in_head else cmd
        proc = subprocess.run(cmd, cwd=CHECKOUT, env=self.env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise DrillError(
                f"python -m pipeline {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
            )

    # ------------------------------------------------------------ nodes

    def start_node(self, name: str, head: bool = False) -> None:
        self.nodes.start(name, head=head, num_cpus=0 if head else 1, hide=self.hidden, private_tmp=True)

    def next_worker(self) -> str:
        """The name of the next worker node: worker1, worker2, ... over every node ever started."""
        return f"worker{sum(name.startswith('worker') for name in self.nodes.nodes) + 1}"

    def start_cluster(self) -> list[str]:
        """The head (``self.head``) and ``--workers`` worker nodes, all up; returns their names."""
        self.start_node(self.head, head=True)
        for _ in range(self.args.workers):
            self.start_node(self.next_worker())
        live = {name for name, proc in self.nodes.nodes.items() if proc.poll() is None}
        self.nodes.wait_alive(live)
        return sorted(live)

    def ray_session(self, name: str) -> str:
        """The folder of node ``name``'s Ray session in its private /tmp (``session_<time>_<pid>``)."""
        return os.path.basename(os.readlink(self.nodes.view(name) / "tmp/ray/session_latest"))

    # ------------------------------------------------------------ the job

    def overrides(self, name: str | None = None) -> list[str]:
        a, s = self.args, self.args.crop / 64  # the demo's 64 / [73, 137] / 73, scaled alike
        # Elastic on [workers - 1, workers], so losing a node shrinks the run and the replacement
        # grows it back (Ray Train checks for room every resize_check_s); a preemption drill's
        # run keeps its size, so that its resumed weights can equal an uninterrupted run's.
        workers = a.workers if "preempt" in a.kill else f"[{a.workers - 1},{a.workers}]"
        sizes = [f"data.crop_size={a.crop}", f"data.scale_min={round(73 * s)}"]
        sizes += [f"data.scale_max={round(137 * s)}", f"data.val_resize={round(73 * s)}"]
        return [
            f"name={name or a.name}", f"data.root={self.data_uri}", f"checkpoint.storage_path=s3://{BUCKET}/runs",
            f"model.name={a.model}", f"model.num_classes={a.classes}", f"optim.batch_size={a.batch}",
            f"schedule.epochs={a.epochs}",
            f"cluster.num_workers={workers}", f"cluster.resize_check_s={a.resize_check}",
            # The first start waits this long; after a node loss Ray Train first asks again for all
            # workers (its view lags), and cluster.restart_timeout_s bounds that wait.
            f"cluster.start_timeout_s={a.start_timeout}", f"cluster.restart_timeout_s={a.restart_timeout}",
            f"cluster.max_failures={a.max_failures}",
            "cluster.cpus_per_worker=1", "cluster.use_gpu=false", "tracking.mode=offline",
            "log_every_n_steps=1",  # a step line each step: the drill times the first resumed one
            *(sizes if a.crop != 64 else []),
            # Each node's cache sits in its private 4 GB /tmp, less than the default limit's
            # headroom (5 GB at least): a limit of its own, as the cluster templates set one.
            *(["data.cache_limit_gb=1"] if self.sharded else []),
        ]  # fmt: skip

    def submit(self, job_id: str | None = None, name: str | None = None) -> None:
        # Only env vars: the code goes as the working dir (Ray leaves out what .gitignore does),
        # and the nodes already run this venv (a `pip:` env would clone it).
        env_vars = {**self.aws, "PYTHONUNBUFFERED": "1", "RAY_COLOR_PREFIX": "0", "WANDB_MODE": "offline"}
        env_vars["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"  # Ray Train's worker groups in its state API
        cmd = [
            RAY, "job", "submit", "--address", self.nodes.address, "--submission-id", job_id or self.job_id,
            "--working-dir", str(CHECKOUT), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--no-wait",
            "--", "sh", "cluster/scripts/job_python.sh", "-m", "pipeline", "train",
            "--config", self.args.config, *self.overrides(name),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=CHECKOUT, env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise DrillError(f"ray job submit failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")

    def running(self) -> bool:
        return self.nodes.job_status(self.job_id) not in JOB_ENDED

    def checkpoint_whole(self, epochs: int) -> bool:
        from pipeline.train.checkpoint import STATE_FILE, checkpoint_name

        return locations.kind(locations.join(self.run_uri, checkpoint_name(epochs), STATE_FILE)) == "file"

    def mid_epoch(self, past: int = 0, same: Any = lambda: True) -> dict[str, Any] | None:
        """Wait until the run is ``--kill-at`` % into an epoch after the first and after epoch
        ``past`` (by the time the epoch before took): that one's checkpoint whole in the bucket
        (its upload runs in the background) and ``metrics.jsonl`` not yet holding this one, and
        ``same()`` (sampled when the checkpoint is seen) unchanged by then. Returns the records
        then, the epoch under way, the wait and ``same()``'s value; None if the job ends first."""
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and self.running():
            done = self.run.read_metrics()
            if done and past < len(done) < self.args.epochs and self.checkpoint_whole(len(done)):
                seen, sample, took = time.monotonic(), same(), done[-1]["epoch_time_s"]
                time.sleep(self.args.kill_at / 100 * took)
                if sample is not None and self.run.read_metrics() == done and same() == sample:
                    return {"records": done, "epoch": len(done) + 1, "after": time.monotonic() - seen,
                            "took": took, "sample": sample}  # fmt: skip
            time.sleep(0.3)
        return None

    def kill_rank0_mid_epoch(self) -> dict[str, Any] | None:
        """SIGKILL rank 0's node (Ray Train's state API names it) mid-epoch."""
        at = self.mid_epoch(same=self.nodes.train_rank0)
        if at is None:
            return None
        (node, pid), groups = at["sample"], len(self.nodes.worker_groups())
        return {**at, "node": node, "pid": pid, "processes": self.nodes.kill_node(node), "groups": groups}

    def preempt_rank0(self) -> dict[str, Any] | None:
        """Rank 0's node drained for a preemption mid-epoch with ``--deadline`` seconds (how a
        spot reclaim reaches Ray from the autoscaler or KubeRay; ``ray drain-node`` here), then
        SIGKILLed whole at the deadline, and a new node started, as a replacement would be."""
        at = self.mid_epoch(same=self.nodes.train_rank0)
        if at is None:
            return None
        node, pid = at["sample"]
        node_id = self.nodes.alive()[node]
        cmd = [
            RAY, "drain-node", "--address", self.nodes.gcs, "--node-id", node_id,
            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "the drill's spot reclaim",
            "--deadline-remaining-seconds", str(self.args.deadline),
        ]  # fmt: skip
        drained = time.monotonic()
        proc = subprocess.run(cmd, cwd=CHECKOUT, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise DrillError(f"ray drain-node failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        time.sleep(max(0.0, drained + self.args.deadline - time.monotonic()))
        processes = self.nodes.kill_node(node)
        self.start_node(self.next_worker())
        return {**at, "node": node, "node_id": node_id, "pid": pid, "processes": processes}

    def reference_run(self) -> str:
        """The same job without events, its run under ``<name>-reference``; its final status. A
        run resumed exactly ends with the same weights as this one."""
        job_id = f"{self.job_ids[0]}-reference"
        self.submit(job_id, f"{self.args.name}-reference")
        return self.nodes.wait_job(job_id, self.args.timeout)

    # ------------------------------------------------------------ the job ended from outside, then submitted again

    def stop_job(self) -> dict[str, Any]:
        """``ray job stop`` (what ``make job-stop`` runs): Ray ends the job's driver, and with it
        Ray Train's controller and workers."""
        cmd = [RAY, "job", "stop", "--address", self.nodes.address, self.job_id]
        proc = subprocess.run(cmd, cwd=CHECKOUT, env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise DrillError(f"ray job stop failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return {"status": self.nodes.wait_job(self.job_id, 120), "run": self.ended_train_run(self.job_id)}

    def ended_train_run(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """Ray Train's record of the job's run once it has ended (its state actor marks a run
        whose controller died without aborting within seconds): ``status`` and ``status_detail``."""
        ray_job, deadline = self.nodes.api(f"/api/jobs/{job_id}")["job_id"], time.monotonic() + timeout
        while True:
            runs = [
                r for r in self.nodes.api("/api/train/v2/runs/v1")["train_runs"] if r["job_id"] == ray_job
            ]
            if (
                runs and runs[-1]["status"] in {"FINISHED", "ERRORED", "ABORTED"}
            ) or time.monotonic() > deadline:
                return (
                    runs[-1] if runs else {"status": "none", "status_detail": "no Ray Train run of the job"}
                )
            time.sleep(1)

    def lose_head(self) -> dict[str, Any]:
        """The head SIGKILLed whole (the job's driver, Ray Train's controller, the GCS, the
        dashboard; its private /tmp goes with its mount namespace), then its worker nodes, as a
        RayJob retry deletes the RayCluster (a launcher cluster's workers lose the GCS too); then
        a new head and workers that start with nothing of theirs."""
        old, session = self.head, self.ray_session(self.head)
        self.save_job_log(self.job_id)
        self.lost_groups = self.group_sizes()
        processes = self.nodes.kill_node(old)
        workers = [name for name, proc in self.nodes.nodes.items() if proc.poll() is None]
        for name in workers:
            processes += self.nodes.kill_node(name)
        self.head = f"head{sum(name.startswith('head') for name in self.nodes.nodes) + 1}"
        nodes = self.start_cluster()
        seen = (self.nodes.view(self.head) / "tmp/ray" / session).exists()
        return {"old": old, "session": session, "processes": processes, "old_workers": workers,
                "nodes": nodes, "session_seen": seen}  # fmt: skip

    def resubmit(self) -> None:
        """The same job again under a new submission id, as ``make submit`` or a RayJob retry does."""
        self.job_ids.append(f"{self.job_ids[0]}-{len(self.job_ids)}")
        self.submit()

    def first_resumed_step(self, since: float) -> tuple[int | None, float | None]:
        """(the epoch the job says it restored, seconds from ``since`` to its first step line
        after that), from the job's log; None for what it did not print before it ended."""
        deadline, restored = time.monotonic() + self.args.timeout, None
        while time.monotonic() < deadline and self.running():
            log = self.nodes.job_logs(self.job_id)
            restored = RESTORED.search(log)
            if restored and STEP_LINE.search(log, restored.end()):
                return int(restored[1]), time.monotonic() - since
            time.sleep(0.5)
        return (int(restored[1]) if restored else None), None

    def wait_for_group(self, size: int, after: int, timeout: float) -> bool:
        """Until Ray Train runs a worker group of ``size``, its ``after``-th or later."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            groups = self.nodes.worker_groups()[after:]
            if any(g["status"] == "RUNNING" and len(g["workers"]) == size for g in groups):
                return True
            time.sleep(1)
        return False

    def wait_for_epoch_by(self, size: int, epoch: int, timeout: float) -> bool:
        """Until ``metrics.jsonl`` holds epoch ``epoch`` or later as recorded by a group of ``size``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            if any(r["epoch"] >= epoch and r.get("world_size") == size for r in self.run.read_metrics()):
                return True
            time.sleep(0.5)
        return False

    def group_sizes(self) -> list[int]:
        """The sizes of every worker group Ray Train started in the drill, in order (those of a
        lost head's cluster as it last knew them)."""
        return self.lost_groups + [len(g["workers"]) for g in self.nodes.worker_groups()]

    def job_log(self, job_id: str) -> str:
        """The job's log: as saved (``save_job_log``, a lost head's job) or as the dashboard has it."""
        saved = self.root / f"{job_id}.log"
        return saved.read_text() if saved.is_file() else self.nodes.job_logs(job_id)

    def save_job_log(self, job_id: str) -> None:
        """``<root>/<job id>.log``: the job's log as the dashboard has it now (a lost head's goes with it)."""
        if log := self.nodes.job_logs(job_id):
            (self.root / f"{job_id}.log").write_text(log)

    def stop(self, keep: bool) -> None:
        if keep:  # the jobs' logs and Ray's own logs (in each node's private /tmp), while they live
            for job in self.job_ids:
                self.save_job_log(job)
            self.nodes.copy_ray_logs(self.root / "nodes")
        self.nodes.stop(keep=keep)
