"""The cluster/ folder's files as the cluster tests read them: where they are, and the pins they
must agree with (pyproject's version and dependencies, the runtime envs).

Imported by ``test_cluster_launcher``, ``test_cluster_kuberay``, ``test_cluster_image_and_env``
and ``test_cluster_commands_and_docs``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = sorted([*CLUSTER.glob("aws/*.yaml"), *CLUSTER.glob("gcp/*.yaml")])
KUBE_YAMLS = sorted(CLUSTER.glob("kuberay/*.yaml"))
RAY_VERSION = "2.60.0"
# The image cluster/Dockerfile builds, as each template names it (registry, then name:version).
PROJECT_IMAGE = re.compile(r"^(?P<registry>\S+)/resnet-pipeline:(?P<tag>[\w.-]+)$")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_env(name: str = "runtime_env.yaml") -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def project_deps_without_ray() -> list[str]:
    return [d for d in pyproject()["project"]["dependencies"] if not re.match(r"ray\b", d)]
