"""``python -m pipeline wandb-sync RUN_DIR``: one W&B history for a run, whatever crashed on the way.

    python -m pipeline wandb-sync runs/resnet50                 # merge, then `wandb sync` it
    python -m pipeline wandb-sync s3://bucket/runs/resnet50 --dry-run

A run whose rank 0 was restarted has one offline W&B segment per restart (all with the same
run id) under ``RUN_DIR/wandb/``. Synced one by one they leave holes: a killed segment may
never have flushed its last records, and the server drops rows of a resumed segment whose
step is not above the last one it has. This command builds one offline run instead:

- the epoch rows from ``metrics.jsonl`` (the run's record of truth: each epoch exactly once);
- the every-N-steps rows from the segments, a later segment replacing an earlier one from its
  first step on (what a restart redid);
- the config and the final numbers from the run's files;

writes it to ``--out`` (default ``RUN_DIR/wandb-merged`` for a local run, else
``./wandb-merged/<name>``) and uploads it with ``wandb sync`` when a W&B key is set (with
``--dry-run`` or no key it says the command to run later).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.store import locations
from pipeline.store.rundir import RunDir

SEGMENT = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(\w+)$")  # wandb's folder per run start: its time


def find_segments(run_location: str) -> list[str]:
    """The run's ``.wandb`` files under ``wandb/``, oldest segment first."""
    root = locations.join(run_location, "wandb")
    if locations.kind(root) != "dir":
        return []
    found = []
    for rel, is_dir in locations.list_tree(root):
        parts = rel.split("/")
        if is_dir or not rel.endswith(".wandb") or len(parts) < 2:
            continue
        match = SEGMENT.match(parts[-2])  # "latest-run" (a link to one of them) is not a segment
        if match:
            found.append((match[1], locations.join(root, rel)))
    return [path for _, path in sorted(found)]


def _local_copy(location: str, folder: Path) -> Path:
    if not locations.is_uri(location):
        return Path(location)
    local = folder / f"{len(list(folder.iterdir()))}.wandb"
    local.write_bytes(locations.read_bytes(location) or b"")
    return local


def merge_history(
    segments: list[list[dict[str, Any]]], epochs: list[dict[str, Any]]
) -> list[tuple[int, dict]]:
    """(step, row) in step order: step rows from the segments (a later segment wins from its first
    step on), epoch rows from ``metrics.jsonl`` at their ``step``."""
    rows: list[tuple[int, dict]] = []
    later_first = float("inf")
    for history in reversed(segments):
        steps = [r for r in history if "train/step_loss" in r and r.get("_step") is not None]
        rows += [(int(r["_step"]), _clean(r)) for r in steps if r["_step"] < later_first]
        if steps:
            later_first = min(later_first, min(r["_step"] for r in steps))
    rows += [(int(r["step"]), dict(r)) for r in epochs]
    return sorted(rows, key=lambda item: (item[0], "train/loss" in item[1]))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _identity(segment: str, local: Path, config: dict[str, Any]) -> dict[str, str]:
    """The run's id, project, entity, group and name: from the segment's run record, or (a segment
    killed before it flushed anything) from its folder name and the run's config."""
    tracking = config.get("tracking") or {}
    fallback = {
        "id": SEGMENT.match(segment.rsplit("/", 2)[-2])[2],
        "project": tracking.get("project") or "",
        "entity": tracking.get("entity") or "",
        "group": tracking.get("group") or "",
        "name": config.get("name") or "",
    }
    return _segment_run(local) or fallback


def _segment_run(path: Path) -> dict[str, str]:
    """The run record's identity fields of one segment (id, project, entity, group, name)."""
    from pipeline.tracking.offline import read_wandb_records

    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {
                "id": run.run_id,
                "project": run.project,
                "entity": run.entity,
                "group": run.run_group,
                "name": run.display_name,
            }
    return {}


def write_merged(
    out: Path, identity: dict[str, str], config: dict, rows: list[tuple[int, dict]], summary: dict
) -> Path:
    """Write the merged history as a fresh offline run under ``out``; returns its folder."""
    import wandb

    from pipeline.tracking.tracker import define_metrics

    out.mkdir(parents=True, exist_ok=True)
    wandb.setup(settings=wandb.Settings(silent=True))
    run = wandb.init(
        mode="offline",
        dir=str(out),
        id=identity["id"],
        project=identity.get("project") or None,
        entity=identity.get("entity") or None,
        group=identity.get("group") or None,
        name=identity.get("name") or None,
        config=config,
        settings=wandb.Settings(silent=True, console="off"),
    )
    define_metrics(run)
    for step, row in rows:
        run.log({k: v for k, v in row.items() if v is not None}, step=step)
    run.summary.update(summary)
    folder = Path(run.settings.sync_dir)
    run.finish()
    wandb.teardown()  # returns once the .wandb file is whole
    return folder


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline wandb-sync", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", help="the run's folder or URI (<checkpoint.storage_path>/<name>)")
    parser.add_argument("--out", help="where to write the merged offline run")
    parser.add_argument(
        "--dry-run", action="store_true", help="merge and say what would be uploaded; upload nothing"
    )
    args = parser.parse_args(argv)

    run_dir = RunDir(args.run_dir if locations.is_uri(args.run_dir) else str(Path(args.run_dir).resolve()))
    epochs = run_dir.read_metrics()
    segments = find_segments(run_dir.location)
    if not epochs or not segments:
        what = "metrics.jsonl" if not epochs else "offline W&B run under wandb/"
        print(
            f"error: {args.run_dir}: no {what}; is it a run folder of this pipeline (tracking offline)?",
            file=sys.stderr,
        )
        return 2
    name = run_dir.location.rstrip("/").rsplit("/", 1)[-1]
    out = Path(
        args.out
        or (
            locations.join(run_dir.location, "wandb-merged")
            if not locations.is_uri(run_dir.location)
            else f"wandb-merged/{name}"
        )
    )
    if out.exists():
        shutil.rmtree(out)  # a fresh merge each time: the source of truth is the run's own files
    from pipeline.tracking.offline import read_wandb_history

    with tempfile.TemporaryDirectory() as tmp:
        local = [_local_copy(s, Path(tmp)) for s in segments]
        histories = [read_wandb_history(p) for p in local]
        identity = _identity(segments[-1], local[-1], run_dir.read_config())
    rows = merge_history(histories, epochs)
    summary = run_dir.read_summary() or {}
    finals = {}
    if summary.get("eval_mode"):
        mode = summary["eval_mode"]
        finals = {
            f"final/{mode}/top1_err": summary.get("val_top1_err"),
            f"final/{mode}/top5_err": summary.get("val_top5_err"),
        }
    folder = write_merged(out, identity, run_dir.read_config(), rows, finals)
    print(
        f"merged {len(segments)} segment(s) of run {identity['id']}: {len(epochs)} epoch rows from metrics.jsonl, "
        f"{len(rows) - len(epochs)} step rows -> {folder}"
    )
    import wandb

    from pipeline.tracking.tracker import missing_credentials

    wandb_cli = str(Path(sys.executable).parent / "wandb")
    reason = "--dry-run" if args.dry_run else missing_credentials(wandb)
    if reason is not None:
        print(f"not uploaded ({reason}); upload with: {wandb_cli} sync {folder}")
        return 0
    proc = subprocess.run([wandb_cli, "sync", str(folder)])
    return 0 if proc.returncode == 0 else 1
