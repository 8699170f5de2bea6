"""Before a worker starts: GPUs or not, whether the worker group can ever be placed, shared paths.

    plan = check_cluster(cfg, address)    # ConfigError (every reason) before any training
    plan.use_gpu, plan.resources          # what the ScalingConfig asks for

``cluster.use_gpu: auto`` is decided from what the cluster can provide, not only from the
nodes up now (``pipeline.driver.cluster_state``):

- a local Ray started here: this machine's GPUs;
- a cluster with GPUs up now: GPUs;
- a cluster of nodes started by hand (no autoscaler can add any): the nodes up now;
- an autoscaling cluster whose node types are known: GPUs when a node type has them (Ray
  Train then asks the autoscaler for those nodes and waits);
- otherwise it cannot be known, and ``auto`` is refused: the message says to set
  ``cluster.use_gpu=true`` or ``false``.

``cluster.use_gpu: true`` that no node and no node type can satisfy fails here. When the
node types are unknown, Ray Train waits for GPU nodes, bounded by ``cluster.start_timeout_s``
per attempt and ``cluster.start_retries`` (``ray_runner``).

On a cluster of more than one node, a local ``checkpoint.storage_path`` must be visible from
every node and a local ``data.root`` must exist on every node (``pipeline.driver.node_probe``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import ClusterConfig, Config, ConfigError, requested_gpu
from pipeline.driver.cluster_state import ClusterView, inspect_cluster
from pipeline.store.locations import is_uri

EPS = 1e-9  # fractional resources (0.5 GPU) add up in floating point


@dataclass(frozen=True)
class WorkerPlan:
    """The decision: GPUs or not and why, each worker's resources, and where they can go."""

    use_gpu: bool
    resources: dict[str, float]
    gpu_reason: str
    placement: str  # how the workers fit, or why that cannot be checked
    warnings: tuple[str, ...] = ()


def decide_gpu(cluster: ClusterConfig, view: ClusterView) -> tuple[bool, str, list[str]]:
    """(use_gpu, why, warnings) for ``cluster.use_gpu``; ConfigError when it cannot be decided or met."""
    wanted = requested_gpu(cluster)
    now, most = view.gpus_now, view.gpus_max
    if wanted is False:
        return False, "cluster.use_gpu=false", []
    if view.scaling == "local":
        if now > 0:
            return True, f"this machine has {now:g} GPU(s) (local Ray started here)", []
        if wanted:
            raise ConfigError(
                "cluster.use_gpu=true, but this machine has no GPU that Ray can see (a local Ray was "
                "started here because RAY_ADDRESS is not set); set cluster.use_gpu=false, or submit "
                "the job to a GPU cluster"
            )
        return False, "this machine has no GPU (local Ray started here)", []
    if now > 0:
        return True, f"{now:g} GPU(s) up now on the cluster", []
    if most is not None and most > 0:
        return True, f"no GPU up now, the autoscaler can add up to {most:g} ({view.source})", []
    if most is not None:  # known: nothing can bring a GPU
        why = (
            "the cluster's nodes are fixed (started by hand) and none has a GPU"
            if view.scaling == "fixed"
            else f"no node up has a GPU and no node type the autoscaler may start has one ({view.source})"
        )
        if wanted:
            raise ConfigError(
                f"cluster.use_gpu=true cannot be met: {why}; set cluster.use_gpu=false or add GPU nodes"
            )
        return False, why, []
    # Unknown: what can join this cluster cannot be read.
    tried = "; ".join(view.notes) or "no source"
    if wanted:
        warning = (
            "no GPU is up and the autoscaler's node types are unknown: Ray Train asks for GPU nodes and "
            f"waits up to cluster.start_timeout_s={cluster.start_timeout_s:g}s per attempt, "
            f"cluster.start_retries={cluster.start_retries} retries"
        )
        return True, "cluster.use_gpu=true", [warning]
    raise ConfigError(
        f"cluster.use_gpu=auto cannot be decided on the cluster at {view.address}: none of its "
        f"{len(view.nodes)} node(s) up has a GPU, and what its autoscaler can add is unknown ({tried}). "
        "Set cluster.use_gpu=true to train on GPUs (Ray Train asks the autoscaler for GPU nodes and "
        "waits) or cluster.use_gpu=false to train on CPUs."
    )


def worker_slots(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many workers of ``bundle`` one node holds."""
    slots = math.inf
    for key, need in bundle.items():
        if need > 0:
            slots = min(slots, math.floor(node.get(key, 0.0) / need + EPS))
    return 0 if slots == math.inf else int(slots)


def check_fit(cluster: ClusterConfig, resources: dict[str, float], view: ClusterView) -> str:
    """How ``cluster.num_workers`` workers of ``resources`` fit; ConfigError when they never can
    (an elastic run needs room for its minimum only: it starts with what fits)."""
    n, strategy = cluster.min_workers, cluster.placement_strategy
    count = f"{n}" if not cluster.elastic else f"{n}-{cluster.max_workers}"
    ask = f"{count} worker(s) x {_fmt(resources)} ({strategy})"
    nodes = view.richest_nodes(lambda node: worker_slots(node, resources))
    if nodes is None:
        return f"{ask}: not checked, what the cluster can add is unknown"
    room = [(worker_slots(node, resources), count) for node, count in nodes]
    total = sum(slots * count for slots, count in room if slots)
    nodes_with_room = sum(count for slots, count in room if slots)
    best = max((slots for slots, _ in room), default=0)
    fits = {
        "STRICT_PACK": best >= n,
        "STRICT_SPREAD": nodes_with_room >= n,
    }.get(strategy, total >= n)
    where = (
        "the nodes up now" if view.scaling in ("local", "fixed") else "the autoscaler's node types at most"
    )
    most = f"{_num(total)} worker(s) on {_num(nodes_with_room)} node(s), at most {best} on one"
    if fits:
        return f"{ask}: fits ({where}: room for {most})"
    raise ConfigError(
        f"cluster: {ask} can never be placed on {where}: room for {most}. Lower cluster.num_workers, "
        "cluster.cpus_per_worker or cluster.gpus_per_worker, pick another cluster.placement_strategy, "
        "or add nodes"
    )


def _num(x: float) -> str:
    return "unlimited" if x == math.inf else f"{x:g}"


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def plan_workers(cluster: ClusterConfig, view: ClusterView) -> WorkerPlan:
    """Decide GPUs and check placement; ConfigError naming the key when either fails."""
    use_gpu, why, warnings = decide_gpu(cluster, view)
    resources = {"CPU": cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    placement = check_fit(cluster, resources, view)
    return WorkerPlan(use_gpu, resources, why, placement, tuple(warnings))


def check_cluster(cfg: Config, address: str | None) -> WorkerPlan:
    """Everything about the cluster that can fail before training, all reasons in one ConfigError."""
    from pipeline.driver.node_probe import shared_path_problems

    view = inspect_cluster(address)
    problems = []
    try:
        plan = plan_workers(cfg.cluster, view)
    except ConfigError as e:
        problems.append(str(e))
    local_paths = not (is_uri(cfg.checkpoint.storage_path) and is_uri(cfg.data.root))
    if len(view.nodes) > 1 and local_paths:  # one node sees its own disk; a probe is a task per node
        problems += shared_path_problems(cfg, view.nodes)[0]
    if problems:
        raise ConfigError("\n".join(problems))
    return plan
