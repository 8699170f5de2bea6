"""``make install`` says which torch and DALI builds it installed and the driver they need."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.build_info import describe

ROOT = Path(__file__).resolve().parents[1]


def test_the_cuda13_set_names_its_builds_and_driver():
    lines = describe("2.14.1+cu130", "13.0", {"nvidia-dali-cuda130": "2.4.0"}, "580.65.06")
    assert lines[0] == "torch 2.14.1+cu130: CUDA 13.0 build"
    assert "DALI nvidia-dali-cuda130 2.4.0: CUDA 13 build" in lines
    assert "NVIDIA driver: 580.65.06" in lines
    assert lines[-1] == "these builds need NVIDIA driver R580 or newer"
    assert not [line for line in lines if "warning" in line or "too old" in line]


def test_an_old_driver_and_mixed_sets_are_named():
    # The registry's CUDA 13 set on an R550 driver.
    lines = describe("2.14.1", "13.0", {"nvidia-dali-cuda130": "2.4.0"}, "550.54.15")
    assert "NVIDIA driver: 550.54.15: too old for these builds" in lines
    # The CUDA 12 set fits it.
    lines = describe("2.14.1+cu128", "12.8", {"nvidia-dali-cuda120": "2.4.0"}, "550.54.15")
    assert "NVIDIA driver: 550.54.15" in lines and lines[-1].endswith("R525 or newer")
    # Half of each: torch for CUDA 12, DALI for 13.
    lines = describe("2.14.1+cu128", "12.8", {"nvidia-dali-cuda130": "2.4.0"}, None)
    assert any("different CUDA versions" in line for line in lines)
    # Both DALI builds at once (a later plain `pip install -e .` brings the cuda130 one back).
    lines = describe("2.14.1", "13.0", {"nvidia-dali-cuda130": "2.4.0", "nvidia-dali-cuda120": "2.4.0"}, None)
    assert any("both DALI builds are installed" in line for line in lines)


def test_cpu_only_torch_without_dali():
    lines = describe("2.14.1+cpu", None, {}, None)
    assert lines == [
        "torch 2.14.1+cpu: CPU-only build",
        "DALI: not installed",
        "NVIDIA driver: none found (CPU only on this machine)",
    ]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_prints_what_this_venv_holds():
    import torch

    # -o: the venv is installed already; only the report runs.
    proc = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    expected = f"torch {torch.__version__}: " + (
        f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    )
    assert expected in proc.stdout, proc.stdout
    assert "DALI nvidia-dali-cuda1" in proc.stdout, proc.stdout
