"""The W&B API key comes from the environment only and is never written or printed.

A tiny training runs with WANDB_API_KEY set to a recognisable fake value (W&B offline), then
every file under the run directory (config.yaml, metrics, summary, checkpoints, W&B's own
run files and logs) and everything the command printed is searched for it. The same check on
a two-node cluster, with the key in the nodes' environment as the templates put it there,
is in test_cluster_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def run_tiny_training(
    data_root: Path, storage: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess:
    overrides = [
        "name=secrets",
        f"data.root={data_root}",
        "model.name=resnet18",
        "model.num_classes=4",
        "data.crop_size=32",
        "data.scale_min=36",
        "data.scale_max=48",
        "data.val_resize=36",
        "optim.batch_size=16",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "cluster.num_workers=1",
        "cluster.use_gpu=false",
        "eval.final_mode=center",
        "tracking.mode=offline",
        f"checkpoint.storage_path={storage}",
    ]
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/demo.yaml", *overrides, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_wandb_key_never_reaches_run_files_or_output(tiny_imagenet, tmp_path):
    key = "fakewandbkey" + uuid.uuid4().hex[:28]  # 40 characters, like a real key
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAY_ADDRESS"))}
    env.update(WANDB_API_KEY=key, WANDB_MODE="offline", WANDB_SILENT="true")
    storage = tmp_path / "runs"
    proc = run_tiny_training(tiny_imagenet, storage, env, "--no-ray")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_dir = storage / "secrets"
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    # The search covers what matters: the resolved config, a checkpoint, and W&B's offline run.
    assert "config.yaml" in written and "summary.json" in written, sorted(written)
    assert any(name.endswith("state.pt") for name in written), sorted(written)
    assert any(name.endswith(".wandb") for name in written), sorted(written)

    assert not files_containing(run_dir, key.encode())
    assert key not in proc.stdout and key not in proc.stderr
    # Nor in any W&B folder outside the run dir (wandb falls back to ./wandb when misconfigured).
    for stray in (ROOT / "wandb", tmp_path / "wandb"):
        if stray.exists():
            assert not files_containing(stray, key.encode())
