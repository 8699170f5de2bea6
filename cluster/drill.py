"""The node-loss drill: a cluster without a shared filesystem on this one machine, rank 0 killed mid-epoch.

    make drill                                      # 20 epochs of cifar_resnet20 on 128 images
    make drill DRILL_ARGS="--kill head"             # the head lost, the job submitted again
    make drill DRILL_ARGS="--kill stop,head --epochs 8"   # `ray job stop`, then the head lost
    .venv/bin/python cluster/drill.py --help

As root (a mount namespace per node), on 127.0.0.1 with random ports and its own temp dir: a
local S3 server (moto) with the dataset in ``s3://drill/imagenet``; Ray nodes from
cluster/localnodes.py as cluster/README's rehearsal starts them (the venv not on PATH, token
auth): a head with ``--num-cpus 0`` and N 1-CPU workers, each with a private ``/tmp`` and
``$HOME`` and empty ``data/ runs/ wandb/`` of the checkout; the demo config, elastic on [N-1, N],
submitted as ``make submit`` does it (``cluster/scripts/job_python.sh``), the run in
``s3://drill/runs/<name>``. ``--kill-at`` % into an epoch after the first, rank 0's node (Ray
Train's state API names it) is SIGKILLed whole; once a group of N-1 runs, a new node joins.

``--kill head``, ``--kill stop`` or both in order: what Ray Train cannot bring back, each
mid-epoch, each followed by the same job submitted again (a new submission id, as ``make
submit`` or a KubeRay RayJob retry gives it). ``head``: the head SIGKILLed whole (the driver,
Ray Train's controller, the GCS, the dashboard; its private /tmp goes with it), then its
workers, as a RayJob retry deletes the RayCluster; a new head and workers start from nothing.
``stop``: ``ray job stop``. The drill prints the time from each to the job's first resumed step.

Then one PASS/FAIL line per check, each read from a record, not from the console: Ray's job,
Train and actor state APIs; the bucket's ``metrics.jsonl`` (whose records a resumed worker group
keeps and a fresh start drops), ``summary.json`` and offline W&B segments; the history
``pipeline wandb-sync`` merges; the JSON that ``pipeline eval --no-ray`` writes to the bucket
from the head's namespace. ``--layout sharded``: the dataset is ``data shard``'s output in
``s3://drill/imagenet-shards``, each node's cache in its private ``/tmp``; one more check reads
the server's request counts (``pipeline.bench.s3_latency``): GETs per image, no shard fetched
twice by a node. Exit status: 0 all PASS, 1 a FAIL, 2 the drill could not run. Teardown stops
only what the drill started, never ``ray stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any checkout: import that checkout's pipeline

from localnodes import JOB_ENDED, RAY, LocalNodes  # noqa: E402  (cluster/, beside this script)

from pipeline.store import locations  # noqa: E402
from pipeline.store.rundir import RunDir  # noqa: E402

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
GRACEFUL_ABORT = "Run aborted due to user interrupt (SIGINT)."  # Ray Train's state API, after abort()
STEP_LINE = re.compile(r"\bepoch [\d.]+/\d+ step \d+/\d+ ")  # after Ray's "(RayTrainWorker pid=N) "


class DrillError(RuntimeError):
    """The drill itself cannot go on (the S3 server does not start, a command fails)."""


class Check:
    """The report: one PASS/FAIL line per check."""

    def __init__(self) -> None:
        self.lines: list[tuple[bool, str, str]] = []

    def __call__(self, ok: bool, what: str, detail: str) -> None:
        self.lines.append((bool(ok), what, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not ok for ok, _, _ in self.lines)


class Drill:
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

    @property
    def job_id(self) -> str:
        """The job submitted last."""
        return self.job_ids[-1]

    # ------------------------------------------------------------ object store, dataset, commands

    def start_s3(self) -> None:
        self.aws = self.nodes.start_s3(BUCKET, counted=self.sharded)
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
        cmd = self.nodes.in_namespace(self.head, cmd, cwd=ROOT) if in_head else cmd
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise DrillError(
                f"python -m pipeline {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
            )

    # ------------------------------------------------------------ nodes

    def start_node(self, name: str, head: bool = False) -> None:
        hide = [ROOT / d for d in HIDDEN]
        self.nodes.start(name, head=head, num_cpus=0 if head else 1, hide=hide, private_tmp=True)

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

    def overrides(self) -> list[str]:
        a, s = self.args, self.args.crop / 64  # the demo's 64 / [73, 137] / 73, scaled alike
        sizes = [f"data.crop_size={a.crop}", f"data.scale_min={round(73 * s)}"]
        sizes += [f"data.scale_max={round(137 * s)}", f"data.val_resize={round(73 * s)}"]
        return [
            f"name={a.name}", f"data.root={self.data_uri}", f"checkpoint.storage_path=s3://{BUCKET}/runs",
            f"model.name={a.model}", f"model.num_classes={a.classes}", f"optim.batch_size={a.batch}",
            f"schedule.epochs={a.epochs}",
            # Elastic: [workers - 1, workers], so losing a node shrinks the run and the replacement
            # grows it back (Ray Train checks for room every resize_check_s).
            f"cluster.num_workers=[{a.workers - 1},{a.workers}]", f"cluster.resize_check_s={a.resize_check}",
            # The first start waits this long; after a node loss Ray Train first asks again for all
            # workers (its view lags), and cluster.restart_timeout_s bounds that wait.
            f"cluster.start_timeout_s={a.start_timeout}", f"cluster.restart_timeout_s={a.restart_timeout}",
            f"cluster.max_failures={a.max_failures}",
            "cluster.cpus_per_worker=1", "cluster.use_gpu=false", "tracking.mode=offline",
            "log_every_n_steps=1",  # a step line each step: the drill times the first resumed one
            *(sizes if a.crop != 64 else []),
        ]  # fmt: skip

    def submit(self) -> None:
        # Only env vars: the code goes as the working dir (Ray leaves out what .gitignore does),
        # and the nodes already run this venv (a `pip:` env would clone it).
        env_vars = {**self.aws, "PYTHONUNBUFFERED": "1", "RAY_COLOR_PREFIX": "0", "WANDB_MODE": "offline"}
        env_vars["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"  # Ray Train's worker groups in its state API
        cmd = [
            RAY, "job", "submit", "--address", self.nodes.address, "--submission-id", self.job_id,
            "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--no-wait",
            "--", "sh", "cluster/scripts/job_python.sh", "-m", "pipeline", "train",
            "--config", self.args.config, *self.overrides(),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300)
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

    # ------------------------------------------------------------ the job ended from outside, then submitted again

    def stop_job(self) -> dict[str, Any]:
        """``ray job stop`` (what ``make job-stop`` runs): Ray ends the job's driver, and with it
        Ray Train's controller and workers."""
        cmd = [RAY, "job", "stop", "--address", self.nodes.address, self.job_id]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300)
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


# ---------------------------------------------------------------- the checks


def check_kill(drill: Drill, check: Check, kill: dict | None, replaced_after: float | None) -> None:
    what = "rank 0 killed mid-epoch"
    if kill is None:
        return check(False, what, "no epoch after the first was seen under way (metrics.jsonl, checkpoints)")
    e, n, names = kill["epoch"], drill.args.epochs, ", ".join(kill["processes"])
    check(
        True,
        what,
        f"node {kill['node']} (rank 0, RayTrainWorker pid {kill['pid']}) in epoch {e}/{n}, {kill['after']:.1f} s "
        f"after checkpoint_epoch{e - 1:04d} was whole (epoch {e - 1} took {kill['took']:.1f} s), before "
        f"metrics.jsonl held epoch {e}; {len(kill['processes'])} processes SIGKILLed ({names}); "
        f"a new node up {replaced_after:.1f} s later",
    )


def check_resumed(drill: Drill, check: Check, kill: dict | None, records: list[dict]) -> None:
    """A worker group that restores epoch k keeps ``metrics.jsonl``'s records of epochs 1..k and
    records k+1 on; one that starts from scratch drops them all. So the records of the epochs
    before the kill stay those of the killed group of N, and the kill's epoch is the group of N-1's."""
    n, sizes = drill.args.workers, [r.get("world_size") for r in records]
    e = kill["epoch"] if kill else 0
    ok = e > 1 and sizes[: e - 1] == [n] * (e - 1) and sizes[e - 1 : e] == [n - 1]
    check(
        ok,
        "resumed from a checkpoint",
        f"metrics.jsonl's epochs 1-{e - 1} recorded by groups of {sorted(set(sizes[: e - 1]), key=str)} "
        f"(the killed group: {n}), epoch {e} by {sizes[e - 1 : e]} (the next: {n - 1}); world sizes {sizes}",
    )


def check_metrics(drill: Drill, check: Check) -> list[dict]:
    want, uri = list(range(1, drill.args.epochs + 1)), locations.join(drill.run_uri, "metrics.jsonl")
    records = drill.run.read_metrics()
    got = [r.get("epoch") for r in records]
    detail = f"{got} in {uri} (want {want})" if locations.kind(uri) == "file" else f"{uri} does not exist"
    check(got == want, "metrics.jsonl epochs", detail)
    return records


def check_wandb(drill: Drill, check: Check, records: list[dict]) -> None:
    """What a user gets from ``pipeline wandb-sync RUN``: the run's offline segments in the bucket
    merged (on this machine, from the bucket alone; uploaded nowhere), read back."""
    from pipeline.tracking.offline import read_wandb_history
    from pipeline.tracking.sync import find_segments

    out, want = drill.root / "wandb-merged", list(range(1, drill.args.epochs + 1))
    drill.pipeline("wandb-sync", drill.run_uri, "--dry-run", "--out", str(out))
    (merged,) = out.glob("wandb/offline-run-*/run-*.wandb")
    rows = [row for row in read_wandb_history(merged) if "train/loss" in row]  # epoch rows, not step rows
    got, segments = [r.get("epoch") for r in rows], len(find_segments(drill.run_uri))
    where = f"{segments} segments in the bucket merged by `pipeline wandb-sync` into {merged.parent}"
    check(bool(rows) and got == want, "W&B history epochs", f"{got} (want {want}); {where}")
    by_epoch = {r.get("epoch"): r for r in records}
    diffs = [
        f"epoch {r['epoch']} {k}: W&B {r[k]} vs metrics.jsonl {by_epoch[r['epoch']].get(k)}"
        for r in rows
        for k in ("train/loss", "val/top1_err")
        if r.get("epoch") in by_epoch and k in r and r[k] != by_epoch[r["epoch"]].get(k)
    ]
    compared = f"train/loss and val/top1_err of {len(rows)} epoch rows" if rows else "no epoch rows"
    check(bool(rows) and not diffs, "W&B values = metrics.jsonl", "; ".join(diffs[:4]) or compared)


def check_summary(drill: Drill, check: Check) -> dict | None:
    uri, s = locations.join(drill.run_uri, "summary.json"), drill.run.read_summary()
    if s is None:
        return check(False, "summary.json", f"{uri} does not exist")
    got = f"{uri}: epochs {s.get('epochs')}, {s.get('eval_mode')} top-1 err {s.get('val_top1_err')}"
    check(s.get("epochs") == drill.args.epochs, "summary.json", f"{got}, checkpoint {s.get('checkpoint')}")
    return s


def check_eval(drill: Drill, check: Check, summary: dict | None) -> None:
    """``pipeline eval --no-ray`` of the final checkpoint in the head's namespace (it sees only the
    bucket), its JSON written to the bucket."""
    what = "eval of the final checkpoint"
    if not summary or not summary.get("checkpoint"):
        return check(False, what, "no final checkpoint named in summary.json")
    ckpt, out = summary["checkpoint"], f"s3://{BUCKET}/eval/{drill.job_id}.json"
    in_bucket = ckpt.startswith(drill.run_uri + "/") and locations.kind(ckpt) == "dir"
    mode = f"eval.mode={summary['eval_mode']}"
    drill.pipeline("eval", "--config", drill.args.config, "--no-ray", "--checkpoint", ckpt, "--out", out,
                   *drill.overrides(), mode, in_head=True)  # fmt: skip
    got = json.loads(locations.read_bytes(out) or b"null")
    same = abs(got["top1_err"] - summary["val_top1_err"]) < 1e-9 and got["images"] == summary["val_images"]
    check(
        in_bucket and same,
        what,
        f"{ckpt} {'in' if in_bucket else 'NOT in'} the bucket; {out}: top-1 err {got['top1_err']} on "
        f"{got['images']} images vs summary {summary['val_top1_err']} on {summary['val_images']}",
    )


def check_placement(drill: Drill, check: Check) -> None:
    head = [n["node_id"] for n in drill.nodes.alive_nodes() if n.get("is_head_node")]
    workers = drill.nodes.actor_nodes("RayTrainWorker")
    on_head, used = sum(w in head for w in workers), len(set(workers))
    detail = f"{len(workers)} RayTrainWorker actors on {used} worker nodes, {on_head} on the head"
    check(bool(workers) and bool(head) and on_head == 0, "training placement", detail)


def check_elastic(drill: Drill, check: Check, records: list[dict]) -> None:
    """Ray Train ran a group of N, then of N-1 (which trained: epochs recorded by it), then of N."""
    n, sizes = drill.args.workers, [len(g["workers"]) for g in drill.nodes.worker_groups()]
    shrank = [i for i, size in enumerate(sizes) if size == n - 1]
    grew = bool(shrank) and n in sizes[shrank[0] + 1 :]
    trained, batches = [r.get("world_size") for r in records], {r.get("global_batch") for r in records}
    ok = sizes[:1] == [n] and grew and n - 1 in trained and batches == {drill.args.batch}
    detail = f"worker groups of {sizes} (Ray Train's state API); epoch records' world sizes {trained}"
    check(ok, "elastic shrink and growth", f"{detail}, global batch {sorted(batches, key=str)}")


def shard_gets(gets: int, shards: int, nodes: int, images: int, cached: dict, new: str) -> tuple[bool, str]:
    """Each shard fetched at least once, at most once per node; the replacement ``new`` filled its own cache."""
    ok = shards <= gets <= shards * nodes and cached.get(new, 0) > 0 and max(cached.values()) <= shards
    return ok, (f"{gets} GETs of .tar objects for {shards} shards x {nodes} nodes (at most {shards * nodes}): "
                f"{gets / images:.3f} GETs per image ({images} images); shards in each live node's cache: "
                f"{', '.join(f'{name} {k}' for name, k in cached.items())}")  # fmt: skip


def check_shard_gets(drill: Drill, check: Check) -> None:
    from pipeline.data.shard_cache import DEFAULT_DIR_NAME
    from pipeline.data.shards import load_manifest

    m, live = load_manifest(drill.data_uri), [k for k, p in drill.nodes.nodes.items() if p.poll() is None]
    cache = f"tmp/{DEFAULT_DIR_NAME}/{m.digest[:16]}/*.ok"  # a whole, checked shard in a node's /tmp
    cached = {k: len(list(drill.nodes.view(k).glob(cache))) for k in live}
    images, gets = len(m.split("train")) + len(m.split("val")), drill.nodes.s3_counts().get("GET.tar", 0)
    new = f"worker{drill.args.workers + 1}"  # the replacement
    ok, detail = shard_gets(gets, len(m.shards), len(drill.nodes.nodes), images, cached, new)
    check(ok, "shard GETs", detail)


def check_events(drill: Drill, check: Check, events: list[dict]) -> None:
    """One line per stop or head loss: when it came, what went, how soon the run trained again."""
    n, ids = drill.args.epochs, drill.job_ids
    for i, e in enumerate(events):
        when = (f"in epoch {e['epoch']}/{n}, {e['after']:.1f} s after checkpoint_epoch{e['epoch'] - 1:04d} "
                f"was whole (epoch {e['epoch'] - 1} took {e['took']:.1f} s)")  # fmt: skip
        again = (f"job {ids[i + 1]} submitted again: restored epoch {e['restored']}, its first step "
                 + (f"{e['to_step']:.1f} s after the {e['kind']}" if e["to_step"] is not None else "never came"))  # fmt: skip
        if e["kind"] == "stop":  # aborted as on Ctrl-C: its workers stopped, its resources given back
            run, graceful = e["run"], e["run"].get("status_detail") == GRACEFUL_ABORT
            check(e["status"] == "STOPPED" and graceful and e["to_step"] is not None, "job stopped mid-epoch",
                  f"`ray job stop {ids[i]}` {when}: {e['status']}, Ray Train's run {run['status']} "
                  f"({run.get('status_detail')}); {again}")  # fmt: skip
        else:
            gone = {"gcs_server", "raylet"} <= set(e["processes"])
            fresh = "sees" if e["session_seen"] else "has none of"
            check(gone and not e["session_seen"] and e["to_step"] is not None, "head lost mid-epoch",
                  f"node {e['old']} {when}: {len(e['processes'])} processes SIGKILLed with its workers "
                  f"{', '.join(e['old_workers'])} ({', '.join(sorted(set(e['processes'])))}); new nodes "
                  f"{', '.join(e['nodes'])}, whose head {fresh} the old head's {e['session']}; {again}")  # fmt: skip


def check_resubmitted(drill: Drill, check: Check, events: list[dict], records: list[dict]) -> None:
    """A job that restores epoch k keeps ``metrics.jsonl``'s records of epochs 1..k as they were
    (their times would differ had it started again) and says so: for each job submitted again."""
    problems = []
    for e in events:
        k = len(e["records"])
        if records[:k] != e["records"]:
            problems.append(f"epochs 1-{k} differ from the records in the bucket at the {e['kind']}")
        if e["restored"] is None or e["restored"] < k:  # more: the old workers ended epoch k + 1 first
            problems.append(
                f"after the {e['kind']} in epoch {k + 1} the job restored epoch {e['restored']}, not {k} or later"
            )
    kept = ", ".join(f"1-{len(e['records'])} kept over the {e['kind']}" for e in events)
    check(bool(events) and not problems, "resumed from a checkpoint", "; ".join(problems) or f"epochs {kept}")


def check_one_wandb_run(drill: Drill, check: Check, events: list[dict]) -> None:
    """Every job's W&B segment in the bucket is of one run id (the checkpoint carries it)."""
    from pipeline.tracking.sync import SEGMENT, find_segments

    segments = find_segments(drill.run_uri)
    ids = [SEGMENT.match(Path(s).parent.name)[2] for s in segments]
    want = len(events) + 1
    check(len(set(ids)) == 1 and len(ids) == want, "one W&B run",
          f"{len(ids)} segments (want {want}, one per job) of run ids {sorted(set(ids))}")  # fmt: skip


def run_common_checks(drill: Drill, check: Check) -> list[dict]:
    """The checks of every drill: the run's records, W&B, summary, eval, placement; returns the records."""
    records = guarded(drill, check, "metrics.jsonl epochs", check_metrics) or []
    guarded(drill, check, "W&B history epochs", check_wandb, records)
    summary = guarded(drill, check, "summary.json", check_summary)
    guarded(drill, check, "eval of the final checkpoint", check_eval, summary)
    guarded(drill, check, "training placement", check_placement)
    return records


def guarded(drill: Drill, check: Check, what: str, fn: Any, *args: Any) -> Any:
    """``fn``'s check on its own: one that cannot even run is a FAIL with its error."""
    try:
        return fn(drill, check, *args)
    except Exception as e:  # a check that crashes is a miss, reported like the others
        check(False, what, f"the check failed: {type(e).__name__}: {e}")


def run_resubmission_checks(drill: Drill, check: Check, status: str, events: list[dict]) -> None:
    check(status == "SUCCEEDED", "job", f"{status} (job {drill.job_id}, the last of {len(drill.job_ids)})")
    guarded(drill, check, "stops and head losses", check_events, events)
    records = run_common_checks(drill, check)
    guarded(drill, check, "resumed from a checkpoint", check_resubmitted, events, records)
    guarded(drill, check, "one W&B run", check_one_wandb_run, events)


def run_checks(drill: Drill, check: Check, status: str, kill: dict | None, replaced: float | None) -> None:
    check(status == "SUCCEEDED", "job", f"{status} (job {drill.job_id})")
    guarded(drill, check, "rank 0 killed mid-epoch", check_kill, kill, replaced)
    records = run_common_checks(drill, check)
    guarded(drill, check, "resumed from a checkpoint", check_resumed, kill, records)
    guarded(drill, check, "elastic shrink and growth", check_elastic, records)
    if drill.sharded:
        guarded(drill, check, "shard GETs", check_shard_gets)


def kill_events(text: str) -> list[str]:
    events = text.split(",")
    if events == ["rank0"] or (events and set(events) <= {"stop", "head"}):
        return events
    raise argparse.ArgumentTypeError(f"{text!r}: rank0, or stop and head in any order (e.g. stop,head)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cluster/drill.py", description=__doc__.split("\n\n")[0])
    for flag, default, text in [
        ("--config", "configs/demo.yaml", "config inside this checkout"),
        ("--name", "drill", "run name (the folder under s3://drill/runs/)"),
        ("--epochs", 20, "schedule.epochs (enough for the shrink and the growth back)"),
        ("--classes", 4, "synthetic classes"),
        ("--train-per-class", 32, "synthetic training images per class"),
        ("--val-per-class", 4, "synthetic validation images per class"),
        ("--batch", 16, "global batch (split over the workers)"),
        ("--workers", 3, "worker nodes (1 CPU each); the run is elastic on [N-1, N]"),
        ("--resize-check", 5.0, "cluster.resize_check_s (Ray's default is 60)"),
        ("--start-timeout", 900.0, "cluster.start_timeout_s"),
        (
            "--restart-timeout",
            60.0,
            "cluster.restart_timeout_s: the wait for the lost node's place before shrinking",
        ),
        ("--model", "cifar_resnet20", "model.name (small checkpoints; resnet18 is the demo's)"),
        ("--crop", 32, "training crop; the scales follow the demo's ratios"),
        ("--max-failures", 3, "cluster.max_failures"),
        ("--kill-at", 40.0, "kill this %% into an epoch (by the time the epoch before took)"),
        ("--replace-after", 5.0, "seconds from the group of N-1 running to the new node"),
        ("--timeout", 1200.0, "seconds the job may take"),
    ]:
        p.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")
    p.add_argument("--layout", choices=["folder", "sharded"], default="folder",
                   help="the dataset in the bucket: the folder tree + index, or `data shard`'s shards")  # fmt: skip
    p.add_argument("--kill", type=kill_events, default=["rank0"], metavar="{rank0,EVENT[,EVENT...]}",
                   help="rank0: rank 0's node killed and replaced (the default); or events in order, each "
                   "mid-epoch and followed by the same job submitted again: stop (`ray job stop`), "
                   "head (the head and its workers lost, a new cluster started)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, W&B merge) even on success")
    args = p.parse_args(argv)
    if args.kill != ["rank0"] and args.epochs < 2 * len(args.kill) + 2:
        p.error(f"--epochs must be at least {2 * len(args.kill) + 2} for --kill {','.join(args.kill)}: "
                "each event comes after an epoch the job submitted before it recorded")  # fmt: skip
    if args.workers < 2:
        p.error("--workers must be at least 2: the run goes on with one fewer")
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the kill happens in an epoch after the first")
    if (args.classes * args.train_per_class) // args.batch < 2:
        p.error("fewer than 2 steps per epoch: raise --train-per-class or lower --batch")
    return args


def lose_rank0(drill: Drill, check: Check, say: Any) -> None:
    """Rank 0's node killed mid-epoch; once a group of N-1 runs, a new node joins."""
    n = drill.args.workers
    kill, replaced_after = drill.kill_rank0_mid_epoch(), None
    if kill is not None:
        say(f"killed node {kill['node']} in epoch {kill['epoch']}; waiting for a worker group of {n - 1}")
        killed_at = time.monotonic()
        shrunk = drill.wait_for_group(n - 1, after=kill["groups"], timeout=180)
        say(f"a group of {n - 1} runs" if shrunk else f"no group of {n - 1} within 180 s")
        time.sleep(drill.args.replace_after)
        drill.start_node(drill.next_worker())
        replaced_after = time.monotonic() - killed_at
    status = drill.nodes.wait_job(drill.job_id, drill.args.timeout)
    say(f"job {drill.job_id}: {status}; checking")
    run_checks(drill, check, status, kill, replaced_after)


def stop_or_lose_head(drill: Drill, say: Any) -> list[dict]:
    """Each ``--kill`` event mid-epoch, each in an epoch after the one before, then the same job
    submitted again; the time from the event to the first resumed step."""
    events: list[dict] = []
    for kind in drill.args.kill:
        # After an event, the job submitted again first records an epoch of its own (its W&B
        # segment goes to the bucket with it); the workers of a stopped job may end one more first.
        at = drill.mid_epoch(past=events[-1]["restored"] or len(events[-1]["records"]) if events else 0)
        if at is None:
            say(f"the job ended before the {kind}: no epoch under way was seen")
            break
        start = time.monotonic()
        event = {**at, "kind": kind, **(drill.stop_job() if kind == "stop" else drill.lose_head())}
        say(
            f"{'stopped the job' if kind == 'stop' else 'lost the head'} in epoch {at['epoch']}; submitting it again"
        )
        drill.resubmit()
        event["restored"], event["to_step"] = drill.first_resumed_step(start)
        took = f"{event['to_step']:.1f} s" if event["to_step"] is not None else "no step"
        say(f"job {drill.job_id} restored epoch {event['restored']}: first step {took} after the {kind}")
        events.append(event)
    return events


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        print("error: the drill needs root, unshare and nsenter (a mount namespace per node)", file=sys.stderr)  # fmt: skip
        return 2
    drill, check, start, n = Drill(args), Check(), time.monotonic(), args.workers

    def say(message: str) -> None:
        print(f"== [{time.monotonic() - start:4.0f} s] {message}", flush=True)

    say(f"drill in {drill.root}")
    try:
        drill.start_s3()
        say(f"S3 server at {drill.aws['AWS_ENDPOINT_URL']}; uploading the dataset to {drill.data_uri}")
        drill.upload_dataset()
        drill.start_cluster()
        say(f"Ray head and {n} worker nodes up, dashboard {drill.nodes.address}")
        ok, detail = drill.nodes.isolation([ROOT / d for d in HIDDEN])
        check(ok, "node isolation", detail)
        drill.submit()
        say(f"submitted job {drill.job_id}")
        if args.kill == ["rank0"]:
            lose_rank0(drill, check, say)
        else:
            events = stop_or_lose_head(drill, say)
            status = drill.nodes.wait_job(drill.job_id, args.timeout)
            say(f"job {drill.job_id}: {status}; checking")
            run_resubmission_checks(drill, check, status, events)
    except (RuntimeError, OSError) as e:  # DrillError, a node that does not start, an API that fails
        print(f"error: the drill could not run: {e}", file=sys.stderr)
        check.lines.append((False, "drill", str(e)))
        code = 2
    else:
        code = 1 if check.failed else 0
    finally:
        keep = args.keep or bool(check.failed) or not check.lines
        drill.stop(keep=keep)
    kept = f"; logs kept in {drill.root} (<job id>.log, <node>.log, nodes/, wandb-merged/)" if keep else ""
    say(f"{len(check.lines) - check.failed}/{len(check.lines)} checks passed{kept}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
