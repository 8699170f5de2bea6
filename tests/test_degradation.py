"""``make degradation``, short version, end to end on CPU: the real commands on a tiny synthetic CIFAR-10.

Trains plain-20, plain-56, ResNet-20 and ResNet-56 for a few iterations each (one process per
run, ``--no-ray``, to keep it to seconds), then checks the report and the W&B grouping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_pipeline
from PIL import Image

from pipeline.wandb_offline import read_wandb_records

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
