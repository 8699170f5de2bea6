"""The drill's checks: one PASS/FAIL line each, read from a record, not from the console (Ray's
job, Train and actor state APIs; the bucket's ``metrics.jsonl``, ``summary.json`` and W&B
segments; the merged W&B history; the JSON of ``pipeline eval``; the S3 server's request counts).
Each takes the ``Drill`` (cluster/drill_cluster.py) and the report, ``Check``; ``run_checks``
runs those of the drill's events (rank 0's node lost, the job stopped, the head lost).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from drill_cluster import BUCKET, RESTORED, Drill

from pipeline.store import locations

GRACEFUL_ABORT = "Run aborted due to user interrupt (SIGINT)."  # Ray Train's state API, after abort()


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


def check_kill(drill: Drill, check: Check, kill: dict | None) -> None:
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
        f"a new node up {kill['replaced_after']:.1f} s later",
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
    n, sizes = drill.args.workers, drill.group_sizes()
    shrank = [i for i, size in enumerate(sizes) if size == n - 1]
    grew = bool(shrank) and n in sizes[shrank[0] + 1 :]
    trained, batches = [r.get("world_size") for r in records], {r.get("global_batch") for r in records}
    ok = sizes[:1] == [n] and grew and n - 1 in trained and batches == {drill.args.batch}
    detail = f"worker groups of {sizes} (Ray Train's state API); epoch records' world sizes {trained}"
    check(ok, "elastic shrink and growth", f"{detail}, global batch {sorted(batches, key=str)}")


NOTICE = re.compile(
    r"preemption notice: node (\w+) \(ranks \[[\d, ]*\]\) drained; checkpoint at step (\d+) uploaded in "
    r"([\d.]+) s, (-?[\d.]+ s before|WARNING: [\d.]+ s after) the deadline \(polls every (\d+) steps"
)
LAST = re.compile(
    r"last checkpoint before the deadline at step (\d+) uploaded in ([\d.]+) s, "
    r"(-?[\d.]+ s before|WARNING: [\d.]+ s after) the deadline"
)
STEP = re.compile(r"\bepoch [\d.]+/\d+ step (\d+)/\d+ ")  # rank 0's step lines (log_every_n_steps=1)


def preemption_story(log: str) -> dict[str, Any] | None:
    """From the job's log: the notice's node and checkpoint, the last checkpoint before the
    deadline, the poll interval, the step the next group restored and the killed group's last
    step line before that (None without a notice)."""
    notice = NOTICE.search(log)
    if notice is None:
        return None
    last = LAST.search(log, notice.end())
    restored = RESTORED.search(log, notice.end())
    steps = [int(m[1]) for m in STEP.finditer(log, notice.end(), restored.start() if restored else len(log))]
    return {
        "node": notice[1], "step": int(notice[2]), "upload_s": float(notice[3]), "when": notice[4],
        "every": int(notice[5]), "last_step": int(last[1]) if last else None, "last_when": last[3] if last else None,
        "restored": int(restored[0].rsplit(" ", 1)[1]) if restored else None,
        "trained_to": max(steps) if steps else None,
    }  # fmt: skip


def check_preempted(drill: Drill, check: Check, preempted: dict | None) -> None:
    """The notice's checkpoint before the deadline, the last one too, nothing trained after it
    lost (the restored step is the last checkpoint's and the killed group's last step line)."""
    what = "preempted mid-epoch"
    if preempted is None:
        return check(False, what, "no epoch after the first was seen under way (metrics.jsonl, checkpoints)")
    story = preemption_story(drill.job_log(drill.job_ids[0]))
    e, n = preempted["epoch"], drill.args.epochs
    drained = (f"node {preempted['node']} ({preempted['node_id'][:8]}, rank 0) drained in epoch {e}/{n}, "
               f"{drill.args.deadline} s deadline, killed then")  # fmt: skip
    if story is None:
        return check(False, what, f"{drained}; no preemption notice in the job's log")
    in_time = all(w is None or "before" in w for w in (story["when"], story["last_when"]))
    last = story["last_step"] or story["step"]
    check(
        story["node"] == preempted["node_id"][:8] and in_time,
        what,
        f"{drained}; notice checkpoint at step {story['step']} uploaded in {story['upload_s']} s, "
        f"{story['when']} the deadline; last checkpoint at step {story['last_step']}, {story['last_when']} "
        f"the deadline; polls every {story['every']} steps",
    )
    redone = (
        None
        if story["trained_to"] is None or story["restored"] is None
        else story["trained_to"] - story["restored"]
    )
    check(
        story["restored"] == last and redone is not None and 0 <= redone <= story["every"],
        "steps redone",
        f"the next group restored step {story['restored']} (the last checkpoint: {last}); the killed group's "
        f"last step line: {story['trained_to']}; {redone} steps redone (at most one poll interval, "
        f"{story['every']})",
    )


def check_same_weights(drill: Drill, check: Check, preempted: dict | None, summary: dict | None) -> None:
    """The preempted run's final weights bitwise equal to those of the same job run without events."""
    import torch

    from pipeline.store.rundir import RunDir
    from pipeline.train import checkpoint as ckpt

    what, status = "weights = an uninterrupted run", (preempted or {}).get("reference")
    reference = RunDir(f"s3://{BUCKET}/runs/{drill.args.name}-reference").read_summary()
    if status != "SUCCEEDED" or not reference or not summary:
        return check(
            False, what, f"the reference job: {status}; summaries: {bool(reference)}, {bool(summary)}"
        )
    with ckpt.fetched(summary["checkpoint"]) as a, ckpt.fetched(reference["checkpoint"]) as b:
        mine, theirs = ckpt.read(a)["model"], ckpt.read(b)["model"]
    differ = [k for k in mine if not torch.equal(mine[k], theirs.get(k, torch.empty(0)))]
    check(mine.keys() == theirs.keys() and not differ, what,
          f"{len(mine)} tensors of {summary['checkpoint']} vs {reference['checkpoint']}: "
          + (f"{len(differ)} differ ({', '.join(differ[:3])})" if differ else "bitwise equal"))  # fmt: skip


def shard_gets(gets: int, shards: int, nodes: int, images: int, cached: dict, new: str,
               failed: dict[str, int] | None = None) -> tuple[bool, str]:  # fmt: skip
    """Each shard fetched at least once, at most once per node; the replacement ``new`` filled its own
    cache. ``failed`` (``--faults``): the GETs the server refused or cut, by kind; each is retried,
    so it is not counted as a fetch, and with faults asked some must have failed."""
    lost = sum((failed or {}).values())
    fetched = gets - lost
    ok = shards <= fetched <= shards * nodes and cached.get(new, 0) > 0 and max(cached.values()) <= shards
    ok = ok and (failed is None or lost > 0)
    retried = "" if failed is None else (
        f" (and {lost} that failed and were retried: " + ", ".join(f"{n} {k}" for k, n in failed.items()) + ")"
    )  # fmt: skip
    return ok, (f"{fetched} GETs of .tar objects{retried} for {shards} shards x {nodes} nodes (at most "
                f"{shards * nodes}): {fetched / images:.3f} GETs per image ({images} images); shards in each "
                f"live node's cache: {', '.join(f'{name} {k}' for name, k in cached.items())}")  # fmt: skip


def check_shard_gets(drill: Drill, check: Check) -> None:
    from pipeline.data.cache_shards import SHARDS_FOLDER
    from pipeline.data.shard_cache import DEFAULT_DIR_NAME
    from pipeline.data.shard_manifest import load_manifest

    m, live = load_manifest(drill.data_uri), [k for k, p in drill.nodes.nodes.items() if p.poll() is None]
    cache = f"tmp/{DEFAULT_DIR_NAME}/{SHARDS_FOLDER}/*.ok"  # a whole, checked shard in a node's /tmp
    cached = {k: len(list(drill.nodes.view(k).glob(cache))) for k in live}
    counts = drill.nodes.s3_counts()
    images, gets = len(m.split("train")) + len(m.split("val")), counts.get("GET.tar", 0)
    new = f"worker{drill.args.workers + 1}"  # the replacement
    # A stalled GET is answered in full (5 s < the fetch engine's 20 s timeout): a fetch, not a failure.
    failed = {"refused (503)": counts["refused"], "cut": counts["cut"]} if drill.args.faults else None
    ok, detail = shard_gets(gets, len(m.shards), len(drill.nodes.nodes), images, cached, new, failed)
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
    check(
        bool(events) and not problems,
        "resumed after each resubmission",
        "; ".join(problems) or f"epochs {kept}",
    )


def check_one_wandb_run(drill: Drill, check: Check, events: list[dict]) -> None:
    """Every W&B segment in the bucket is of one run id (the checkpoint carries it): one segment
    per job at least, and one more per worker group that Ray Train started again within a job."""
    from pipeline.tracking.sync import SEGMENT, find_segments

    segments = find_segments(drill.run_uri)
    ids = [SEGMENT.match(Path(s).parent.name)[2] for s in segments]
    jobs = len(events) + 1
    check(len(set(ids)) == 1 and len(ids) >= jobs, "one W&B run",
          f"{len(ids)} segments (at least {jobs}: one per job) of run ids {sorted(set(ids))}")  # fmt: skip


def run_common_checks(drill: Drill, check: Check) -> tuple[list[dict], dict | None]:
    """The checks of every drill: the run's records, W&B, summary, eval, placement; returns the
    records and the summary."""
    records = guarded(drill, check, "metrics.jsonl epochs", check_metrics) or []
    guarded(drill, check, "W&B history epochs", check_wandb, records)
    summary = guarded(drill, check, "summary.json", check_summary)
    guarded(drill, check, "eval of the final checkpoint", check_eval, summary)
    guarded(drill, check, "training placement", check_placement)
    return records, summary


def guarded(drill: Drill, check: Check, what: str, fn: Any, *args: Any) -> Any:
    """``fn``'s check on its own: one that cannot even run is a FAIL with its error."""
    try:
        return fn(drill, check, *args)
    except Exception as e:  # a check that crashes is a miss, reported like the others
        check(False, what, f"the check failed: {type(e).__name__}: {e}")


def run_checks(drill: Drill, check: Check, status: str, kill: dict | None, events: list[dict]) -> None:
    """The checks of the drill's ``--kill`` events, then those of every drill."""
    kinds = drill.args.kill
    rank0, preempt = "rank0" in kinds, "preempt" in kinds
    resubmitted = [kind for kind in kinds if kind in ("stop", "head")]
    failures = f"; cluster.max_failures={drill.args.max_failures}" if preempt else ""
    check(
        status == "SUCCEEDED",
        "job",
        f"{status} (job {drill.job_id}, the last of {len(drill.job_ids)}{failures})",
    )
    if rank0:
        guarded(drill, check, "rank 0 killed mid-epoch", check_kill, kill)
    if resubmitted:
        guarded(drill, check, "stops and head losses", check_events, events)
    if preempt:
        guarded(drill, check, "preempted mid-epoch", check_preempted, kill)
    records, summary = run_common_checks(drill, check)
    if preempt:
        guarded(drill, check, "weights = an uninterrupted run", check_same_weights, kill, summary)
    if rank0:
        guarded(drill, check, "resumed from a checkpoint", check_resumed, kill, records)
        guarded(drill, check, "elastic shrink and growth", check_elastic, records)
    if resubmitted:
        guarded(drill, check, "resumed after each resubmission", check_resubmitted, events, records)
    guarded(drill, check, "one W&B run", check_one_wandb_run, events)
    if (
        drill.sharded and (rank0 or preempt) and "head" not in kinds
    ):  # a lost head takes every node's cache with it
        guarded(drill, check, "shard GETs", check_shard_gets)
