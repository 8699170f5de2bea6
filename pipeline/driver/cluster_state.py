"""What the Ray cluster this driver is joined to has now, and what its autoscaler can add.

    view = inspect_cluster(address)      # after ray.init(); address None: a local Ray started here
    view.gpus_now, view.gpus_max         # None when what the cluster can add is unknown
    print(view.describe())

``ray.cluster_resources()`` lists the nodes that are up. On an autoscaling cluster the GPU
nodes usually are not: their node types scale to zero. So the node types the autoscaler may
start are read from where Ray 2.60 keeps them, first found wins:

1. the cluster config in the GCS (``ray._private.state``; what Ray Train itself consults).
   Ray's own launcher and KubeRay never write it, platforms that do are read here;
2. the cluster launcher's config on the head node (``~/ray_bootstrap_config.yaml``, the
   file ``ray up`` hands the autoscaler; a submitted job's driver runs on the head);
3. the KubeRay ``RayCluster`` resource, fetched and translated the way Ray's KubeRay
   autoscaler does (``RAY_CLUSTER_NAME`` / ``RAY_CLUSTER_NAMESPACE``, set by KubeRay in every
   Ray container, and the pod's service account, which the autoscaler shares).

A cluster started by hand (``ray start`` on each machine) has an autoscaler monitor in read-only
mode: its ``ray status`` report names every node type ``node_<node id>``. Nothing can join
such a cluster on demand, so what is up now is all there is (``scaling == "fixed"``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler's config on the head
STATUS_WAIT_S = 10.0  # a fresh head writes its first `ray status` report within a few seconds


@dataclass(frozen=True)
class Node:
    """A Ray node that is up."""

    node_id: str
    ip: str
    resources: dict[str, float]
    is_head: bool


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may start: resources per node, how many at most."""

    name: str
    resources: dict[str, float]
    max_count: int | None  # None: no limit; the head's type counts the head itself
    min_count: int = 0
    head: bool = False  # the head node's type (the launcher's cap on worker nodes leaves it out)


@dataclass(frozen=True)
class ClusterView:
    """The cluster as the driver sees it: nodes up now, and what can be added (if known)."""

    address: str | None  # None: a local Ray started by this process
    nodes: tuple[Node, ...]
    # "local": started here, nothing joins; "fixed": nodes started by hand, no autoscaler adds
    # any; "autoscaling": node_types says what can be added; "unknown": it cannot be told.
    scaling: Literal["local", "fixed", "autoscaling", "unknown"]
    node_types: tuple[NodeType, ...] = ()
    max_workers: int | None = None  # the launcher's cap on worker nodes over all types
    source: str = ""  # where scaling / node_types came from
    notes: tuple[str, ...] = field(default_factory=tuple)  # why other sources told nothing

    @property
    def gpus_now(self) -> float:
        return sum(n.resources.get("GPU", 0.0) for n in self.nodes)

    @property
    def gpus_max(self) -> float | None:
        """GPUs the cluster can have at most (None: unknown; inf: a node type without limit)."""
        nodes = self.richest_nodes(_gpus)
        return None if nodes is None else sum(_gpus(r) * count for r, count in nodes)

    def richest_nodes(self, score: Callable[[dict[str, float]], float]) -> list[tuple[dict, float]] | None:
        """The most the cluster can hold, as (resources of a node, how many), or None when unknown.

        Up to the launcher's cap on worker nodes (the head is outside it), the nodes that score
        highest come first: each node adds its own amount, so this maximises the total score.
        """
        if self.scaling in ("local", "fixed"):
            return [(n.resources, 1) for n in self.nodes]
        if self.scaling != "autoscaling":
            return None
        chosen, capped = [], []
        for t in self.node_types:
            count = math.inf if t.max_count is None else float(t.max_count)
            if t.head:
                chosen.append((t.resources, 1.0))
                count -= 1
            if count > 0 and score(t.resources) > 0:
                capped.append((t.resources, count))
        left = math.inf if self.max_workers is None else float(self.max_workers)
        for resources, count in sorted(capped, key=lambda rc: score(rc[0]), reverse=True):
            take = min(count, left)
            if take > 0:
                chosen.append((resources, take))
                left -= take
        return chosen

    def describe(self) -> list[str]:
        where = f"cluster at {self.address}" if self.address else "local Ray started here"
        lines = [f"Ray: {where}; {len(self.nodes)} node(s) up, {self.gpus_now:g} GPU(s) now"]
        for n in sorted(self.nodes, key=lambda n: (not n.is_head, n.ip)):
            lines.append(
                f"  node {n.node_id[:8]} {n.ip}{' (head)' if n.is_head else ''}: {_fmt_resources(n.resources)}"
            )
        lines.append(f"scaling: {self.scaling}" + (f" ({self.source})" if self.source else ""))
        for t in self.node_types:
            most = "no limit" if t.max_count is None else f"{t.min_count}..{t.max_count}"
            lines.append(f"  node type {t.name}: {_fmt_resources(t.resources)}, {most}")
        if self.max_workers is not None and self.node_types:
            lines.append(f"  at most {self.max_workers} worker nodes in all")
        if self.scaling != "local":
            gmax = self.gpus_max
            lines.append(f"GPUs at most: {'unknown' if gmax is None else f'{gmax:g}'}")
        lines += [f"  ({note})" for note in self.notes]
        return lines


def _gpus(resources: dict[str, float]) -> float:
    return resources.get("GPU", 0.0)


def _fmt_resources(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
    if "memory" in keep:
        keep["memory"] = f"{keep['memory'] / 2**30:.0f}GiB"
    shown = ", ".join(f"{k} {v:g}" if isinstance(v, float | int) else f"{k} {v}" for k, v in keep.items())
    return "{" + shown + "}"


# ------------------------------------------------------------------ the nodes that are up


def alive_nodes() -> tuple[Node, ...]:
    import ray

    return tuple(
        Node(
            node_id=n["NodeID"],
            ip=n.get("NodeManagerAddress", "?"),
            resources=dict(n.get("Resources", {})),
            is_head="node:__internal_head__" in n.get("Resources", {}),
        )
        for n in ray.nodes()
        if n.get("Alive")
    )


def started_here() -> bool:
    """Whether this process started the Ray it is joined to (``ray.init()`` without an address)."""
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.head)


# ------------------------------------------------------------------ the autoscaler's node types


def node_types_from_autoscaling_config(config: dict[str, Any]) -> tuple[tuple[NodeType, ...], int | None]:
    """Node types from a cluster-launcher style config (``ray up``'s, or KubeRay's translation).

    Raises:
        ValueError: a node type does not state its resources (then its GPUs are unknown).
    """
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if "resources" not in spec:
            raise ValueError(f"node type {name!r} states no resources (detected only at launch)")
        most = spec.get("max_workers", 0)
        types.append(
            NodeType(
                name=name,
                resources={k: float(v) for k, v in spec["resources"].items()},
                max_count=int(most) + (1 if name == head else 0),
                min_count=int(spec.get("min_workers", 0)) + (1 if name == head else 0),
                head=name == head,
            )
        )
    cap = config.get("max_workers")
    return tuple(types), (None if cap is None else int(cap))


def _from_gcs_cluster_config() -> tuple[NodeType, ...] | None:
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return tuple(
        NodeType(
            name=g.name,
            resources={k: float(v) for k, v in g.resources.items()},
            max_count=None if g.max_count == -1 else int(g.max_count),
            min_count=int(g.min_count),
        )
        for g in config.node_group_configs
    )


def _from_launcher_config() -> dict[str, Any] | None:
    file = Path(LAUNCHER_CONFIG).expanduser()
    if not file.is_file():
        return None
    import yaml

    return yaml.safe_load(file.read_text())  # `ray up` writes JSON, which YAML reads too


def _from_kuberay() -> dict[str, Any] | None:
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not name or not namespace:
        return None
    # The same fetch and translation as Ray's KubeRay autoscaler (one try: no retry loop here).
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    ray_cr = KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}")
    return _derive_autoscaling_config_from_ray_cr(ray_cr)


def configured_node_types() -> tuple[tuple[NodeType, ...], int | None, str, list[str]]:
    """(node types, worker-node cap, source, notes) from the first source that has them."""
    notes: list[str] = []
    try:
        types = _from_gcs_cluster_config()
        if types:
            return types, None, "the cluster config in the GCS", notes
        notes.append("GCS cluster config: not reported (Ray's launcher and KubeRay do not write it)")
    except Exception as e:  # a private Ray API: report, never crash the run on it
        notes.append(f"GCS cluster config: {type(e).__name__}: {e}")
    sources = (
        (f"{LAUNCHER_CONFIG} (ray up)", _from_launcher_config, "not on this node"),
        ("the KubeRay RayCluster", _from_kuberay, "RAY_CLUSTER_NAME / RAY_CLUSTER_NAMESPACE not set"),
    )
    for label, read, absent in sources:
        try:
            config = read()
            if config is None:
                notes.append(f"{label}: {absent}")
                continue
            types, cap = node_types_from_autoscaling_config(config)
            if types:
                return types, cap, label, notes
            notes.append(f"{label}: no node types in it")
        except Exception as e:
            notes.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
    return (), None, "", notes


# ------------------------------------------------------------------ `ray status`: is it read-only?


def _status_node_types() -> dict[str, str] | None:
    """node id -> node type, as the autoscaler's own ``ray status`` report names them."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        from ray._private.worker import global_worker
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(global_worker.gcs_client.address)
        return {n.node_id: n.ray_node_type_name for n in status.active_nodes + status.idle_nodes}
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report") or {}
    return report.get("node_type_mapping") or None


def is_read_only(mapping: dict[str, str]) -> bool:
    """The read-only monitor names each node's type after the node itself (Ray's own helper)."""
    from ray.autoscaler._private.util import format_readonly_node_type

    return bool(mapping) and all(t == format_readonly_node_type(n) for n, t in mapping.items())


def _read_status(wait_s: float) -> tuple[dict[str, str] | None, str]:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            mapping = _status_node_types()
        except Exception as e:
            return None, f"ray status: {type(e).__name__}: {e}"
        if mapping or time.monotonic() >= deadline:
            return mapping, "" if mapping else "ray status: no autoscaler report (started with --no-monitor?)"
        time.sleep(1.0)


def inspect_cluster(
    address: str | None, *, local: bool | None = None, status_wait_s: float = STATUS_WAIT_S
) -> ClusterView:
    """The cluster this driver is joined to (``ray.init`` done).

    Args:
        address: the address joined, for messages (None when Ray was started here).
        local: whether this process started Ray; default: asked from Ray.
        status_wait_s: how long to wait for a fresh head's first ``ray status`` report.
    """
    nodes = alive_nodes()
    if local if local is not None else started_here():
        return ClusterView(address=None, nodes=nodes, scaling="local", source="this machine only")
    types, cap, source, notes = configured_node_types()
    if types:
        return ClusterView(address, nodes, "autoscaling", types, cap, source, tuple(notes))
    mapping, note = _read_status(status_wait_s)
    if mapping is not None and is_read_only(mapping):
        return ClusterView(
            address, nodes, "fixed", source="ray status: read-only autoscaler, nodes started by hand"
        )
    if note:
        notes.append(note)
    elif mapping:
        notes.append(f"ray status: an autoscaler manages node types {sorted(set(mapping.values()))}")
    return ClusterView(address, nodes, "unknown", notes=tuple(notes))
