"""The drill: a cluster without a shared filesystem on this one machine, and what a run on it
loses: rank 0's node, the job, the head.

    make drill                                      # all three, 24 epochs of cifar_resnet20 on 256 images
    make drill DRILL_ARGS="--kill rank0"            # rank 0's node lost and replaced only
    make drill DRILL_ARGS="--kill stop,head --epochs 8"   # `ray job stop`, then the head lost
    make drill DRILL_ARGS="--layout sharded --kill rank0 --faults 503:10,cut:20"   # and shard GETs fail
    .venv/bin/python cluster/drill.py --help

As root (a mount namespace per node), on 127.0.0.1 with random ports and its own temp dir: a
local S3 server (moto) with the dataset in ``s3://drill/imagenet``; Ray nodes from
cluster/localnodes.py as cluster/README's rehearsal starts them (the venv not on PATH, token
auth): a head with ``--num-cpus 0`` and N 1-CPU workers, each with a private ``/tmp`` and
``$HOME`` and empty ``data/ runs/ wandb/`` of the checkout; the demo config, elastic on [N-1, N],
submitted as ``make submit`` does it (``cluster/scripts/job_python.sh``), the run in
``s3://drill/runs/<name>``. Then the ``--kill`` events in order, each ``--kill-at`` % into an
epoch after the one before:

- ``rank0``: rank 0's node (Ray Train's state API names it) SIGKILLed whole; once a group of
  N-1 has trained, a new node joins; the next event waits until a group of N trains again.
- ``stop`` and ``head``: what Ray Train cannot bring back, each followed by the same job
  submitted again (a new submission id, as ``make submit`` or a KubeRay RayJob retry gives it).
  ``head``: the head SIGKILLed whole (the driver, Ray Train's controller, the GCS, the
  dashboard; its private /tmp goes with it), then its workers, as a RayJob retry deletes the
  RayCluster; a new head and workers start from nothing. ``stop``: ``ray job stop``. The drill
  prints the time from each to the job's first resumed step.

Then one PASS/FAIL line per check, each read from a record, not from the console: Ray's job,
Train and actor state APIs; the bucket's ``metrics.jsonl`` (whose records a resumed worker group
keeps and a fresh start drops), ``summary.json`` and offline W&B segments; the history
``pipeline wandb-sync`` merges; the JSON that ``pipeline eval --no-ray`` writes to the bucket
from the head's namespace. ``--layout sharded``: the dataset is ``data shard``'s output in
``s3://drill/imagenet-shards``, each node's cache in its private ``/tmp``; one more check reads
the server's request counts (``pipeline.bench.s3_latency``): GETs per image, no shard fetched
twice by a node. ``--faults 503:10,cut:20`` (sharded only): that server fails the shards' GETs,
1 in 10 with 503 SlowDown and 1 in 20 cut after half the body (``stall:N`` too), and every
check must hold as without; the shard GETs check counts the failed GETs apart (each retried
by the fetch engine) and wants some. Exit status: 0 all PASS, 1 a FAIL, 2 the drill could not run. Teardown stops
only what the drill started, never ``ray stop``.

This file is the command and the order of events; the cluster, its bucket and what is done to
its job are in cluster/drill_cluster.py, the checks in cluster/drill_checks.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any checkout: import that checkout's pipeline

# cluster/, beside this script: the cluster and its job, then the checks read from its records.
from drill_checks import Check, run_checks  # noqa: E402
from drill_cluster import Drill  # noqa: E402


def kill_events(text: str) -> list[str]:
    events = text.split(",")
    rest = events[1:] if events[:1] in (["rank0"], ["preempt"]) else events
    if events and set(rest) <= {"stop", "head"}:
        return events
    raise argparse.ArgumentTypeError(
        f"{text!r}: rank0 or preempt (first, if at all), then stop and head in any order (e.g. rank0,stop,head)"
    )


def faults_asked(p: argparse.ArgumentParser, spec: str, layout: str) -> dict[str, int]:
    """``--faults`` as ``Faults`` fields ({} for none); refused unless the shards are read from S3."""
    from pipeline.bench.common import BenchError
    from pipeline.bench.feed_nodes import parse_faults

    if not spec:
        return {}
    if layout != "sharded":
        p.error("--faults needs --layout sharded: the faults touch the shard GETs, which the cache retries")
    try:
        return parse_faults(spec)
    except BenchError as e:
        p.error(str(e))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cluster/drill.py", description=__doc__.split("\n\n")[0])
    for flag, default, text in [
        ("--config", "configs/demo.yaml", "config inside this checkout"),
        ("--name", "drill", "run name (the folder under s3://drill/runs/)"),
        ("--epochs", 24, "schedule.epochs (enough for the shrink, the growth back and each event after)"),
        ("--classes", 4, "synthetic classes"),
        ("--train-per-class", 64, "synthetic training images per class (16 steps an epoch)"),
        ("--val-per-class", 4, "synthetic validation images per class"),
        ("--batch", 16, "global batch (split over the workers)"),
        (
            "--workers",
            0,
            "worker nodes (1 CPU each; 0: 3, or 2 with preempt); elastic on [N-1, N] unless preempt",
        ),
        ("--resize-check", 5.0, "cluster.resize_check_s (Ray's default is 60)"),
        ("--start-timeout", 900.0, "cluster.start_timeout_s"),
        # After rank 0's node is lost Ray Train first asks for all N workers again; 15 s (not the
        # default 60) bounds that wait before it shrinks to N-1: every check holds, a minute sooner.
        (
            "--restart-timeout",
            15.0,
            "cluster.restart_timeout_s: the wait for the lost node's place before shrinking",
        ),
        ("--model", "cifar_resnet20", "model.name (small checkpoints; resnet18 is the demo's)"),
        ("--crop", 32, "training crop; the scales follow the demo's ratios"),
        ("--max-failures", -1, "cluster.max_failures (-1: 3, or 0 with preempt, which must not count)"),
        ("--deadline", 20, "preempt: seconds from the drain to the node's end"),
        ("--kill-at", 40.0, "kill this %% into an epoch (by the time the epoch before took)"),
        ("--replace-after", 5.0, "seconds from the group of N-1's first epoch record to the new node"),
        ("--timeout", 1200.0, "seconds the job may take"),
    ]:
        p.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")
    p.add_argument("--layout", choices=["folder", "sharded"], default="folder",
                   help="the dataset in the bucket: the folder tree + index, or `data shard`'s shards")  # fmt: skip
    p.add_argument("--kill", type=kill_events, default=["rank0", "stop", "head"], metavar="EVENT[,EVENT...]",
                   help="events in order, each mid-epoch: rank0 (rank 0's node killed and replaced) or "
                   "preempt (rank 0's node drained for a preemption, killed at --deadline and replaced; "
                   "the run keeps its size), first if at all; stop (`ray job stop`), head (the head and "
                   "its workers lost, a new cluster started), after each of which the same job is "
                   "submitted again (default rank0,stop,head)")  # fmt: skip
    p.add_argument("--faults", default="", metavar="KIND:N,...",
                   help="--layout sharded: shard GETs the S3 server fails, 1 in N of each KIND (503: "
                   "503 SlowDown, cut: the body cut at half, stall: 5 s without a byte), e.g. 503:10,cut:20")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, W&B merge) even on success")
    args = p.parse_args(argv)
    args.faults = faults_asked(p, args.faults, args.layout)
    if args.max_failures == -1:
        args.max_failures = 0 if "preempt" in args.kill else 3
    # With three or more ranks DDP's first step after a restart sums the gradients in another
    # order than the step it replaces (its buckets are rebuilt after a group's first step), which
    # can change the last bit; the sum of two does not depend on the order: with preempt, whose
    # check wants the weights bitwise equal to an uninterrupted run's, two workers by default.
    if args.workers == 0:
        args.workers = 2 if "preempt" in args.kill else 3
    if args.epochs < 2 * len(args.kill) + 2:
        p.error(f"--epochs must be at least {2 * len(args.kill) + 2} for --kill {','.join(args.kill)}: "
                "each event comes after an epoch the job before it recorded")  # fmt: skip
    if args.workers < 2:
        p.error("--workers must be at least 2: the run goes on with one fewer")
    if (args.classes * args.train_per_class) // args.batch < 2:
        p.error("fewer than 2 steps per epoch: raise --train-per-class or lower --batch")
    return args


def lose_rank0(drill: Drill, say: Any) -> dict[str, Any] | None:
    """Rank 0's node killed mid-epoch; once a group of N-1 has trained, a new node joins. With
    more events to come, until a group of N trains again (they come after the growth)."""
    n = drill.args.workers
    kill = drill.kill_rank0_mid_epoch()
    if kill is None:
        say("the job ended before rank 0's node was killed: no epoch under way was seen")
        return None
    say(f"killed node {kill['node']} in epoch {kill['epoch']}; waiting for a worker group of {n - 1}")
    killed_at = time.monotonic()
    shrunk = drill.wait_for_group(n - 1, after=kill["groups"], timeout=180)
    say(f"a group of {n - 1} runs" if shrunk else f"no group of {n - 1} within 180 s")
    # Ray Train grows a running group as soon as a node joins, so a node that came while the
    # group of N-1 was still restoring would replace it before it trained: wait for its epoch.
    trained = shrunk and drill.wait_for_epoch_by(n - 1, kill["epoch"], timeout=180)
    say(
        f"the group of {n - 1} recorded epoch {kill['epoch']}"
        if trained
        else f"no epoch by a group of {n - 1}"
    )
    time.sleep(drill.args.replace_after)
    drill.start_node(drill.next_worker())
    kill["replaced_after"] = time.monotonic() - killed_at
    if len(drill.args.kill) > 1:
        grown = drill.wait_for_epoch_by(n, kill["epoch"] + 1, timeout=240)
        say(f"a group of {n} trains again" if grown else f"no epoch by a group of {n} again within 240 s")
    return kill


def preempt_rank0(drill: Drill, say: Any) -> dict[str, Any] | None:
    """Rank 0's node drained for a preemption mid-epoch, killed at the deadline, replaced."""
    preempted = drill.preempt_rank0()
    if preempted is None:
        say("the job ended before the drain: no epoch under way was seen")
    else:
        say(f"drained node {preempted['node']} in epoch {preempted['epoch']} with a {drill.args.deadline} s "
            "deadline, killed it then and started a replacement")  # fmt: skip
    return preempted


def stop_or_lose_head(drill: Drill, say: Any, kinds: list[str]) -> list[dict]:
    """Each of ``kinds`` mid-epoch, each in an epoch after the one before, then the same job
    submitted again; the time from the event to the first resumed step."""
    events: list[dict] = []
    past = len(drill.run.read_metrics())  # after rank 0's node was lost and replaced, if it was
    for kind in kinds:
        # After an event, the job submitted again first records an epoch of its own (its W&B
        # segment goes to the bucket with it); the workers of a stopped job may end one more first.
        at = drill.mid_epoch(past=events[-1]["restored"] or len(events[-1]["records"]) if events else past)
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
        ok, detail = drill.nodes.isolation(drill.hidden)
        check(ok, "node isolation", detail)
        drill.submit()
        say(f"submitted job {drill.job_id}")
        kill = lose_rank0(drill, say) if args.kill[0] == "rank0" else None
        preempted = preempt_rank0(drill, say) if args.kill[0] == "preempt" else None
        events = stop_or_lose_head(
            drill, say, [kind for kind in args.kill if kind not in ("rank0", "preempt")]
        )
        status = drill.nodes.wait_job(drill.job_id, args.timeout)
        say(f"job {drill.job_id}: {status}; checking")
        if preempted is not None:
            drill.save_job_log(drill.job_id)
            say("the same job without events, for the weights an exact resume must end with")
            preempted["reference"] = drill.reference_run()
        run_checks(drill, check, status, kill or preempted, events)
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
