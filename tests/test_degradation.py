"""``make degradation``, short version, end to end on CPU: the real commands on a tiny synthetic CIFAR-10.

Trains plain-20, plain-56, ResNet-20 and ResNet-56 for a few iterations each (one process per
run, ``--no-ray``, to keep it to seconds), then checks the report and the W&B grouping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import run_pipeline, tune_make_env
from PIL import Image

from pipeline.tracking.offline import read_wandb_records

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56")


def test_make_degradation_short_run(tmp_path: Path):
    data = tmp_path / "cifar"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "data", "synth-cifar", "--out", str(data),
         "--train-per-class", "1", "--test-per-class", "1"],
        cwd=ROOT, check=True, timeout=120,
    )  # fmt: skip
    storage, report = tmp_path / "runs", tmp_path / "report"
    overrides = [
        "schedule.max_iters=2",  # 10 images, batch 8: 1 iteration per epoch, 2 epochs
        "optim.batch_size=8",
        "data.val_split=0",
        "cluster.num_workers=1",
        "cluster.use_gpu=false",
        "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB__DISABLE_STATS": "true"}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [
            "make", "--no-print-directory", "-C", str(ROOT),
            "-o", ".venv/.installed",  # never reinstall from inside a test
            "degradation",
            f"DATA={data}",
            f"DEGRADATION_ARGS={' '.join(overrides)}",
            "DEGRADATION_TRAIN_FLAGS=--no-ray",
            f"DEGRADATION_REPORT={report}",
            f"PY={sys.executable}",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    summaries = [json.loads(p.read_text()) for p in sorted(storage.glob("*/summary.json"))]
    assert sorted(s["model"] for s in summaries) == sorted(MODELS)

    markdown = (report / "report.md").read_text()
    assert markdown in result.stdout
    for model in MODELS:
        assert f"| {model} |" in markdown
    assert "| 8.75 |" in markdown and "| 6.97 |" in markdown  # Table 6: ResNet-20, ResNet-56
    with Image.open(report / "curves.png") as png:
        assert png.size == (1200, 450)

    # All four runs sit in one W&B group, so one dashboard chart compares them.
    groups = set()
    for summary in summaries:
        (wandb_file,) = Path(summary["wandb_dir"]).glob("*.wandb")
        groups |= {
            r.run.run_group for r in read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "run"
        }
    assert groups == {"degradation-cifar10"}

    # It ends with the command that builds the W&B report of these runs, and that command works.
    command = result.stdout.strip().splitlines()[-2].split()
    assert command[:4] == ["python", "-m", "pipeline", "dashboard"], result.stdout[-1000:]
    assert command[4:] == ["--kind", "degradation", "--entity", "ENTITY", "--project", "resnet-pipeline",
                           "--group", "degradation-cifar10"]  # fmt: skip
    if importlib.util.find_spec("wandb_workspaces") is not None:  # the '.[dashboards]' extra
        dry_run = run_pipeline(*command[3:], "--dry-run", timeout=180)
        assert dry_run.returncode == 0, dry_run.stderr[-2000:]
        assert json.loads(dry_run.stdout)["displayName"].endswith("(degradation-cifar10)")


NETS = ("plain20", "plain56", "resnet20", "resnet56")


def _make_seeds(data: Path, storage: Path, report: Path, ray_tmp: str) -> subprocess.CompletedProcess:
    overrides = [
        "schedule.max_iters=24",  # 40 images, batch 8: 5 iterations per epoch, 5 epochs
        "optim.batch_size=8",
        "cluster.use_gpu=false",
        "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]
    env = tune_make_env(ray_tmp)
    return subprocess.run(
        [
            "make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "degradation",
            "SEEDS=2", f"DATA={data}", f"DEGRADATION_ARGS={' '.join(overrides)}",
            "DEGRADATION_SWEEP_ARGS=--cpus-per-trial 1",  # two trials at a time on two cores
            f"DEGRADATION_REPORT={report}", f"PY={sys.executable}",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_make_degradation_with_seeds_resumes_and_reports_the_verdict(tmp_path: Path, request):
    """`make degradation SEEDS=2` on a tiny synthetic CIFAR-10: eight Ray Tune trials named by
    network and seed in one W&B group, the report over seeds with the verdict computed from the
    runs, and a re-run that finishes only the run whose summary is missing, from its checkpoint."""
    import statistics

    data = tmp_path / "cifar"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "data", "synth-cifar", "--out", str(data),
         "--train-per-class", "4", "--test-per-class", "2"],
        cwd=ROOT, check=True, timeout=120,
    )  # fmt: skip
    storage, report = tmp_path / "runs", tmp_path / "report"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    result = _make_seeds(data, storage, report, ray_tmp)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    names = [f"cifar10-{net}-seed{seed}" for net in NETS for seed in (0, 1)]
    for name in names:
        run = storage / name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["name"] == name and summary["steps"] == 24
        (wandb_file,) = Path(summary["wandb_dir"]).glob("*.wandb")
        (record,) = [r.run for r in read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "run"]
        assert (record.display_name, record.run_group) == (name, "degradation-cifar10")
    seeds = {
        name: int(yaml.safe_load((storage / name / "config.yaml").read_text())["seed"]) for name in names
    }
    assert seeds == {name: int(name[-1]) for name in names}
    first = (storage / "cifar10-plain20-seed0" / "metrics.jsonl").read_text()
    assert first != (storage / "cifar10-plain20-seed1" / "metrics.jsonl").read_text()  # the seed matters

    # The verdict is computed from the runs' own files.
    def final_train(name: str) -> float:
        rows = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]
        return rows[-1]["train/top1_err"]

    markdown = (report / "report.md").read_text()
    assert "## Several seeds per network" in markdown and "| cifar_plain56 | 2 |" in markdown
    margin = statistics.fmean(final_train(f"cifar10-plain56-seed{s}") for s in (0, 1)) - statistics.fmean(
        final_train(f"cifar10-plain20-seed{s}") for s in (0, 1)
    )
    line = next(x for x in markdown.splitlines() if x.startswith("- Degradation (cifar_plain56"))
    assert f"margin {margin:+.2f} points" in line
    assert ("does not hold" in line) == (margin <= 0)
    assert any(x.startswith("- Residual learning (cifar_resnet56") for x in markdown.splitlines())
    with Image.open(report / "curves.png") as png:
        assert png.size == (1200, 450)

    # Interrupted after its last checkpoint but before its summary: a re-run finishes only that run.
    (storage / "cifar10-resnet56-seed1" / "summary.json").unlink()
    again = _make_seeds(data, storage, report, ray_tmp)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("finished already:") == 7
    assert "sweep: 1 of 8 trials to run (cifar10-resnet56-seed1)" in again.stdout
    assert f"restored from checkpoint {storage}/cifar10-resnet56-seed1/checkpoint_epoch0005" in again.stdout
    rows = (storage / "cifar10-resnet56-seed1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4, 5]  # nothing logged twice
    assert (storage / "cifar10-resnet56-seed1" / "summary.json").is_file()
