"""The node-loss drill (``make drill``), small: 3 epochs of 8 steps on 128 images at 32 px.

Runs ``cluster/drill.py`` as a user would: a moto S3 server, a Ray head and two worker nodes
in their own mount namespaces, rank 0's node killed mid-epoch and replaced. About 3 minutes
on 2 cores. Needs root (one mount namespace per node).

    .venv/bin/python -m pytest -q tests/test_drill.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {
    "node isolation",
    "job",
    "rank 0 killed mid-epoch",
    "resumed from a checkpoint",
    "metrics.jsonl epochs",
    "W&B history epochs",
    "W&B values = metrics.jsonl",
    "summary.json",
    "eval of the final checkpoint",
    "training placement",
}


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="the drill needs root, unshare and nsenter (a mount namespace per node)",
)
@pytest.mark.skip(
    reason="issue 13: passes once the pipeline keeps a run in object storage: RunDir appends to the "
    "bucket's metrics.jsonl instead of overwriting it from a new node's empty staging copy, the W&B "
    "offline segments live under the storage path, and `pipeline eval` reads s3:// checkpoints; "
    "remove this mark with those fixes"
)
def test_drill_survives_losing_rank_0s_node():
    proc = subprocess.run(
        [
            sys.executable,
            "cluster/drill.py",
            "--epochs",
            "3",
            "--classes",
            "4",
            "--train-per-class",
            "32",
            "--val-per-class",
            "4",
            "--crop",
            "32",
            "--batch",
            "16",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    failed = [line for line in report if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(report) + "\n" + proc.stderr[-4000:]
    assert {line[6:].split(":", 1)[0] for line in report} == CHECKS, report
