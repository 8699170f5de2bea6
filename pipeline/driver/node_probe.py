"""Ask every node that is up what it sees: the storage marker, the dataset, its Python and packages.

    answers = probe_nodes(nodes, marker=path, token=t, data_probe="/data/imagenet/train")
    problems = path_problems(cfg, nodes, answers, marker_dir)

One zero-CPU task pinned to each node (``NodeAffinitySchedulingStrategy``, not soft), so a
node whose CPUs are all taken by training, or that offers none (a CPU-0 head), still answers.
Each task runs in the job's runtime environment, so what it reports is what a training worker
on that node gets.
"""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.driver.cluster_state import Node

PROBE_TIMEOUT_S = 300.0  # a node may first build the job's runtime env (pip) before it answers
MARKER_PREFIX = ".pipeline-visibility-"
PACKAGES = ("torch", "ray", "wandb")  # and whichever nvidia-dali-* build is installed


@dataclass(frozen=True)
class Answer:
    """One node's answer, or why it gave none (``error``)."""

    marker_seen: bool | None = None  # None: no marker asked about
    data_seen: bool | None = None
    python: str = ""
    packages: tuple[tuple[str, str], ...] = ()
    wandb_mode: str = ""  # the W&B mode rank 0 would use on this node
    wandb_key: bool = False  # WANDB_API_KEY or a netrc entry present (never the value)
    error: str = ""


def _probe(marker: str | None, token: str | None, data_probe: str | None, tracking_mode: str) -> dict:
    """Runs on the node: only reads, never writes."""
    from importlib import metadata

    from pipeline.tracking.tracker import resolve_mode

    seen = None
    if marker is not None:
        try:
            seen = Path(marker).read_text() == token
        except OSError:
            seen = False
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "missing"
    for dist in metadata.distributions():
        name = dist.metadata.get("Name") or ""
        if name.startswith("nvidia-dali"):
            packages[name] = dist.version
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        in_netrc = "api.wandb.ai" in netrc.read_text()
    except OSError:
        in_netrc = False
    return {
        "marker_seen": seen,
        "data_seen": Path(data_probe).is_dir() if data_probe else None,
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "packages": tuple(sorted(packages.items())),
        "wandb_mode": resolve_mode(tracking_mode),
        "wandb_key": bool(os.environ.get("WANDB_API_KEY")) or in_netrc,
    }


def probe_nodes(
    nodes: tuple[Node, ...],
    *,
    marker: str | None = None,
    token: str | None = None,
    data_probe: str | None = None,
    tracking_mode: str = "disabled",
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, Answer]:
    """node id -> what that node answered (within ``timeout_s`` in all)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_probe)
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(
            marker, token, data_probe, tracking_mode
        ): n.node_id
        for n in nodes
    }
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    answers = {node_id: Answer(error=f"no answer within {timeout_s:.0f} s") for node_id in refs.values()}
    for ref in ready:
        try:
            answers[refs[ref]] = Answer(**ray.get(ref))
        except Exception as e:  # the task itself failed there (missing package, runtime env, ...)
            answers[refs[ref]] = Answer(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    for ref in refs:
        if ref not in ready:
            ray.cancel(ref, force=True)
    return answers


@contextmanager
def storage_marker(storage_path: str):
    """A file with a fresh token in the local storage folder, removed afterwards: (path, token)."""
    folder = Path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / f"{MARKER_PREFIX}{token[:12]}"
    marker.write_text(token)
    try:
        yield str(marker), token
    finally:
        marker.unlink(missing_ok=True)


def _names(nodes: list[Node]) -> str:
    return ", ".join(f"{n.ip} (node {n.node_id[:8]})" for n in nodes)


def path_problems(
    nodes: tuple[Node, ...],
    answers: dict[str, Answer],
    *,
    storage_path: str | None,
    data_root: str | None,
    data_probe: str | None,
) -> list[str]:
    """Messages for every node that cannot see the storage marker or the dataset, or gave no answer."""
    problems = []
    silent = [n for n in nodes if answers[n.node_id].error]
    for n in silent:
        problems.append(
            f"node {n.ip} (node {n.node_id[:8]}) could not be checked: {answers[n.node_id].error}"
        )
    blind = [n for n in nodes if answers[n.node_id].marker_seen is False]
    if storage_path and blind:
        problems.append(
            f"checkpoint.storage_path={storage_path} is a local folder that {_names(blind)} cannot see: a marker "
            f"file the driver wrote there is not visible from {'that node' if len(blind) == 1 else 'those nodes'}. "
            "Every node writes checkpoints and reads them back after a restart, so on a multi-node cluster "
            "use object storage (checkpoint.storage_path=s3://bucket/prefix or gs://...) or a filesystem "
            "mounted at the same path on every node."
        )
    missing = [n for n in nodes if answers[n.node_id].data_seen is False]
    if data_root and missing:
        problems.append(
            f"data.root={data_root}: {data_probe} does not exist on {_names(missing)}. Every worker reads "
            "the dataset from data.root on its own node: copy it to the same path on every node "
            "(cluster/scripts/stage_imagenet.sh), mount it there, or use data.root=s3://..."
        )
    return problems


def shared_path_problems(cfg: Any, nodes: tuple[Node, ...]) -> tuple[list[str], dict[str, Answer]]:
    """Probe every node for the local ``checkpoint.storage_path`` and ``data.root`` (URIs are skipped).

    Returns:
        (problems, answers): a message per problem, and each node's answer.
    """
    from pipeline.store.locations import is_uri

    storage = None if is_uri(cfg.checkpoint.storage_path) else cfg.checkpoint.storage_path
    root = None if is_uri(cfg.data.root) else cfg.data.root
    from pipeline.data.source import data_probe_path

    probe = data_probe_path(cfg.data.dataset, root) if root else None
    ask = dict(data_probe=probe, tracking_mode=cfg.tracking.mode)
    try:
        if storage:
            with storage_marker(storage) as (marker, token):
                answers = probe_nodes(nodes, marker=marker, token=token, **ask)
        else:
            answers = probe_nodes(nodes, **ask)
    except OSError as e:
        return [f"checkpoint.storage_path={storage}: the driver cannot write there: {e}"], {}
    return path_problems(nodes, answers, storage_path=storage, data_root=root, data_probe=probe), answers
