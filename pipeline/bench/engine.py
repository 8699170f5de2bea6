"""``python -m pipeline bench engine``: the training loop's step rate, this checkout against another commit.

    python -m pipeline bench engine --data data/synth-bench --json
    python -m pipeline bench engine --data data/synth-bench --baseline b9c611b   # before/after a change

The real training command (``python -m pipeline train --no-ray`` on the demo's recipe, one
process, W&B off) runs for a few epochs; the figure is the median ``img_per_s`` of the epochs
after the first (``metrics.jsonl``): data, forward, backward, optimizer, the loop's own
bookkeeping. With ``--baseline REV`` the same command also runs in a temporary git worktree
of REV, alternating with this checkout's runs so that both meet the same load, and the
result holds both rates and their ratio. CPU only here: on a GPU the loop's host
synchronisations matter far more (docs/benchmarks.md says how to see them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.bench.common import BenchError, finish_machine, machine_info, median, ratio

HELP = "the training loop's img/s (train --no-ray on the demo recipe), optionally against another commit"
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, required=True, help="ImageNet-layout folder with train/ and val/"
    )
    parser.add_argument("--baseline", help="a git revision to measure the same way (a temporary worktree)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not counted")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (one process)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternated")
    parser.add_argument("--threads", type=int, default=0, help="DALI threads (0: every usable CPU)")


def _overrides(args: argparse.Namespace, storage: str, name: str) -> list[str]:
    return [
        f"name={name}",
        f"data.root={args.data.resolve()}",
        f"data.num_threads={args.threads}",
        f"optim.batch_size={args.batch_size}",
        f"schedule.epochs={args.epochs}",
        "schedule.milestones=[1000]",
        "cluster.num_workers=1",
        "cluster.use_gpu=false",
        "eval.final_mode=center",
        "tracking.mode=disabled",
        "log_every_n_steps=1000",
        f"checkpoint.storage_path={storage}",
    ]


def _run(tree: Path, args: argparse.Namespace, storage: str, name: str) -> float:
    """One training run in ``tree``; the median img/s of its epochs after the first."""
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", "configs/demo.yaml", "--no-ray"]
    proc = subprocess.run(
        cmd + _overrides(args, storage, name), cwd=tree, env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise BenchError(f"training in {tree} failed:\n{proc.stderr[-2000:]}")
    metrics = Path(storage) / name / "metrics.jsonl"
    rates = [json.loads(line)["img_per_s"] for line in metrics.read_text().splitlines() if line.strip()]
    return median(rates[1:] or rates)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.data / "train").is_dir():
        raise BenchError(
            f"{args.data}: no train/ folder; make one with `python -m pipeline data synth --out {args.data}`"
        )
    if args.epochs < 2 or args.repeats < 1:
        raise BenchError(f"need --epochs >= 2 and --repeats >= 1, got {args.epochs}, {args.repeats}")
    machine = machine_info()
    storage = tempfile.mkdtemp(prefix="bench-engine-")
    trees = {"current": ROOT}
    worktree = None
    try:
        if args.baseline:
            worktree = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
            added = subprocess.run(
                ["git", "worktree", "add", "--detach", str(worktree), args.baseline],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            if added.returncode != 0:
                raise BenchError(f"--baseline {args.baseline}: {added.stderr.strip()}")
            trees["baseline"] = worktree
        runs: dict[str, list[float]] = {name: [] for name in trees}
        start = time.perf_counter()
        for r in range(args.repeats):
            for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                runs[name].append(_run(trees[name], args, storage, f"{name}-{r}"))
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if worktree is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True
            )
    result = {
        "bench": "engine",
        "data": str(args.data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "img_per_s": median(runs["current"]),
        "runs": runs,
        "baseline": args.baseline,
        "wall_s": time.perf_counter() - start,
        "machine": finish_machine(machine),
    }
    if args.baseline:
        result["baseline_img_per_s"] = median(runs["baseline"])
        result["ratio"] = ratio(result["img_per_s"], result["baseline_img_per_s"])
    return result


def format_text(result: dict[str, Any]) -> str:
    line = f"training loop (train --no-ray, demo recipe, batch {result['batch_size']}): {result['img_per_s']:.1f} img/s"
    if result.get("baseline"):
        line += (
            f"; {result['baseline']}: {result['baseline_img_per_s']:.1f} img/s; ratio {result['ratio']:.3f}"
        )
    return line
