"""The cluster's commands and docs: ``make submit`` / ``job-*`` refuse to run without their
variables (exit 2, a message); cluster/README documents every cluster field and template;
``cluster/scripts/stage_imagenet.sh`` turns (tiny) ImageNet archives into the layout.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cluster_files import CLUSTER, KUBE_YAMLS, LAUNCHER_YAMLS, ROOT, rel

from pipeline.config import ClusterConfig


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    # -o: this interpreter's venv is the installed project; never re-install it from a test.
    return subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", "ADDRESS=http://127.0.0.1:8265"], "CONFIG is not set"),
        (["submit", "CONFIG=configs/demo.yaml"], "ADDRESS is not set"),
        (["submit", "CONFIG=configs/demo.yaml", "ADDRESS=127.0.0.1:8265"], "must be the dashboard URL"),
        (
            ["submit", "CONFIG=configs/none.yaml", "ADDRESS=http://x:8265", "RAY_AUTH_MODE=disabled"],
            "not found",
        ),
        (
            ["submit", "CONFIG=/etc/hosts", "ADDRESS=http://x:8265", "RAY_AUTH_MODE=disabled"],
            "inside this checkout",
        ),
        (
            ["submit", "CONFIG=configs/demo.yaml", "ADDRESS=http://x:8265", "RUNTIME_ENV=cluster/none.yaml"]
            + ["RAY_AUTH_MODE=disabled"],
            "RUNTIME_ENV file not found",
        ),
        (["job-logs", "ADDRESS=http://127.0.0.1:8265"], "JOB is not set"),
        (["job-status", "ADDRESS=http://127.0.0.1:8265"], "JOB is not set"),
        (["job-stop", "JOB=raysubmit_x"], "ADDRESS is not set"),
    ],
)
def test_make_job_targets_refuse_missing_variables(args, message):
    proc = make(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    if "is not set" in message:
        assert "Usage: make " in proc.stderr, proc.stderr


@needs_make
def test_make_submit_needs_the_ray_token(tmp_path):
    proc = make(
        "submit", "CONFIG=configs/demo.yaml", "ADDRESS=http://127.0.0.1:8265", env={"HOME": str(tmp_path)}
    )
    assert proc.returncode == 2 and "no Ray auth token" in proc.stderr, proc.stderr


@needs_make
def test_make_address_defaults_to_ray_address(tmp_path):
    # RAY_ADDRESS supplies ADDRESS; the missing token is the next thing reported.
    proc = make("job-status", "JOB=x", env={"RAY_ADDRESS": "http://127.0.0.1:8265", "HOME": str(tmp_path)})
    assert proc.returncode == 2 and "no Ray auth token" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ docs and the ImageNet staging script


def test_readme_documents_every_cluster_field_and_template():
    readme = (CLUSTER / "README.md").read_text()
    for f in dataclasses.fields(ClusterConfig):
        assert f"cluster.{f.name}" in readme, f.name
    for path in [
        *LAUNCHER_YAMLS,
        *KUBE_YAMLS,
        CLUSTER / "runtime_env.yaml",
        CLUSTER / "runtime_env_pip.yaml",
        CLUSTER / "Dockerfile",
        CLUSTER / "scripts" / "stage_imagenet.sh",
    ]:
        assert rel(path) in readme, rel(path)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "WANDB_API_KEY"):
        assert var in readme


def _jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(out, format="JPEG")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_stage_imagenet_script_builds_the_layout(tmp_path):
    src, dest = tmp_path / "archives", tmp_path / "shared" / "imagenet"
    src.mkdir()
    wnids, jpeg = ["n01440764", "n01443537"], _jpeg()
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as outer:
        for w in wnids:  # the official train archive is a tar of per-class tars
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(3):
                    _add(t, f"{w}_{i}.JPEG", jpeg)
            _add(outer, f"{w}.tar", inner.getvalue())
    with tarfile.open(src / "ILSVRC2012_img_val.tar", "w") as t:
        for i in range(1, 5):
            _add(t, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg)
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(f"ILSVRC2012_val_{i:08d},{wnids[i % 2]} 1 2 3 4\n" for i in range(1, 5))
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = str(CLUSTER / "scripts" / "stage_imagenet.sh")
    proc = subprocess.run(
        ["bash", script, str(src), str(dest)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (dest / "train").iterdir()) == wnids
    assert len(list((dest / "train" / wnids[0]).glob("*.JPEG"))) == 3
    assert sum(1 for _ in (dest / "val").glob("n*/*.JPEG")) == 4
    assert not (dest / "_archives").exists()
    again = subprocess.run(
        ["bash", script, str(src), str(dest)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "already staged" in again.stdout, again.stdout + again.stderr
