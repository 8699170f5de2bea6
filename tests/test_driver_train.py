"""The real worker function, in one process and on a 2-worker local Ray Train (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_pipeline, tiny_overrides

from pipeline.config import load_config, to_dict

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_process_training_writes_run_dir(tiny_imagenet, tmp_path):
    from pipeline.train.loop import train_worker

    cfg = load_config(
        None, tiny_overrides(tiny_imagenet, tmp_path, "solo") + ["cluster.num_workers=1", "schedule.epochs=2"]
    )
    summary = train_worker(to_dict(cfg))
    run_dir = tmp_path / "solo"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for key in (
        "epoch",
        "step",
        "lr",
        "train/loss",
        "train/top1_err",
        "val/top1_err",
        "val/top5_err",
        "img_per_s",
        "data_wait_frac",
        "perf/data_stall_pct",
        "perf/checkpoint_block_s",
    ):
        assert key in records[-1], key
    assert records[-1]["step"] == 2 * (128 // 16)
    assert (
        0 <= records[-1]["val/top1_err"] <= 100 and records[-1]["val/top5_err"] == 0.0
    )  # 4 classes: top-5 always hits
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["eval_mode"] == "tencrop" and on_disk["val_images"] == 16
    assert on_disk["val_top1_err"] == pytest.approx(summary["val_top1_err"])
    assert (Path(on_disk["checkpoint"]) / "state.pt").is_file()
    resolved = (run_dir / "config.yaml").read_text()
    assert "per_worker_batch: 16" in resolved and f"root: {tiny_imagenet}" in resolved


def test_cli_rejects_bad_layout_before_ray(tmp_path):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "val" / "cls").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/demo.yaml", f"data.root={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cls" in proc.stderr and "Ray" not in proc.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_demo_console_is_quiet_it_learns_and_a_second_run_repeats_it_exactly(
    tiny_imagenet, tmp_path, local_ray
):
    """What `make demo` prints to a file or pipe: our lines, Ray's warnings, no per-report INFO, no
    colour, no harmless Ray line marked as an error. The run on 2 Ray Train workers (gloo) learns
    and reports. And the demo's promise: on one machine a second run (here the same config on the
    test file's Ray, from this process) gives the same losses and errors to the last digit."""
    overrides = tiny_overrides(tiny_imagenet, tmp_path, "quiet") + ["schedule.epochs=6"]
    proc = run_pipeline("train", "--config", "configs/demo.yaml", *overrides)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Ray Train's preemption watcher made Ray log an "E ... core_worker.cc" line on every local run.
    assert "PreemptionWatcher" not in out and "max_restarts > 0" not in out
    for line in (
        "resolved config:",
        "derived:",
        "epoch 1/6 done:",
        "epoch 6/6 done:",
        "final (tencrop",
        "== summary ==",
    ):
        assert line in out, line
    assert out.count("epoch 6/6 done:") == 1  # rank 0 alone prints progress
    assert "Reporting training result" not in out and "TrainingReport(" not in out
    assert "\x1b[" not in out  # no ANSI colour codes when the output is not a terminal

    from pipeline.driver.train_cmd import train_on_ray

    again = tmp_path / "again"
    cfg = load_config(
        "configs/demo.yaml", tiny_overrides(tiny_imagenet, again, "quiet") + ["schedule.epochs=6"]
    )
    result = train_on_ray(cfg)
    assert result.error is None
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "state.pt").is_file()
    assert result.metrics["epoch"] == 6 and "val/top1_err" in result.metrics
    records = read_jsonl(again / "quiet" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, 7))
    losses = [r["train/loss"] for r in records]
    assert losses[-1] < losses[0], losses
    assert records[-1]["step"] == 6 * (128 // 16)
    assert all(r["world_size"] == 2 and r["global_batch"] == 16 for r in records)
    summary = json.loads((again / "quiet" / "summary.json").read_text())
    assert summary["val_images"] == 16  # every val image scored once across the 2 workers

    timing = ("img_per_s", "epoch_time_s", "data_wait_frac", "wall_s", "gpu_mem_gb")

    def numbers(run_dir: Path) -> tuple[list[dict], dict]:
        rows = [
            {k: v for k, v in r.items() if k not in timing and not k.startswith("perf/")}
            for r in read_jsonl(run_dir / "metrics.jsonl")
        ]
        summary = json.loads((run_dir / "summary.json").read_text())
        return rows, {k: summary[k] for k in ("val_top1_err", "val_top5_err", "steps")}

    assert numbers(again / "quiet") == numbers(tmp_path / "quiet")

    # The 2 ranks scored with rank 0's BN statistics: the same as one process scoring the final
    # checkpoint (rank 0's weights and buffers), to the last image.
    from pipeline.driver.eval_cmd import eval_worker

    for mode, expect_err, expect_loss in (
        ("tencrop", summary["val_top1_err"], None),
        ("center", records[-1]["val/top1_err"], records[-1]["val/loss"]),  # the last epoch's validation
    ):
        one = load_config(
            "configs/demo.yaml",
            tiny_overrides(tiny_imagenet, again, "quiet") + ["cluster.num_workers=1", f"eval.mode={mode}"],
        )
        record = eval_worker(to_dict(one), summary["checkpoint"])
        assert record["images"] == 16 and record["top1_err"] == expect_err, mode
        if expect_loss is not None:  # continuous: any rank scoring with its own BN statistics shows here
            assert record["loss"] == pytest.approx(expect_loss, rel=1e-6)


def test_torchrun_two_processes_print_once_and_exit_cleanly(tiny_imagenet, tmp_path):
    """``torchrun --nproc_per_node 2 -m pipeline train --no-ray``: the same run without Ray.

    Rank 0 alone prints the config, progress and summary. Both processes end their gloo group
    and exit 0, with the bf16 gradient hook on (left to the interpreter's exit, that group
    sometimes aborted the process).
    """
    overrides = tiny_overrides(tiny_imagenet, tmp_path, "torchrun") + [
        "schedule.epochs=2",
        "eval.final_mode=center",
        "precision.grad_compression=bf16",
        "tracking.mode=disabled",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline"]
        + ["train", "--config", "configs/demo.yaml", "--no-ray", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for line in ("resolved config:", "epoch 2/2 done:", "== summary =="):
        assert out.count(line) == 1, (line, out[-3000:])
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2


SIGTERM_PROBE = """
import os, signal, sys
from pipeline.driver.ray_runner import abort_on_sigterm
abort_on_sigterm()
if sys.argv[1] == "train":  # what Ray Train's fit() sets: a SIGINT handler that aborts the run
    def abort(signum, frame):
        print("aborted on", signal.Signals(signum).name, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGINT, abort)
os.kill(os.getpid(), signal.SIGTERM)
print("still running", flush=True)
"""


@pytest.mark.parametrize("handler", ["train", "none"])
def test_sigterm_aborts_the_run_as_ctrl_c_does(handler):
    """``ray job stop`` sends the driver SIGTERM: Ray Train's own SIGINT handler runs (it aborts
    the run and gives its resources back), and without one the driver still exits, 128 + 15."""
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_PROBE, handler], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if handler == "train":
        assert (proc.returncode, proc.stdout) == (0, "aborted on SIGTERM\n"), proc.stderr
    else:
        assert (proc.returncode, proc.stdout) == (143, ""), proc.stderr
