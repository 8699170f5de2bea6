"""``python -m pipeline train --config FILE ... --dry-run``: what training would do here, without training.

    python -m pipeline train --config configs/imagenet/resnet50.yaml data.root=s3://b/imagenet --dry-run
    make submit CONFIG=configs/imagenet/resnet50.yaml ADDRESS=http://127.0.0.1:8265 \\
        ARGS="--dry-run data.root=/mnt/imagenet"          # as a job: the job's runtime env is seen

After the usual preflight (config, dataset, model), it joins Ray the way ``train`` does and
prints: the nodes up and what the autoscaler can add, the GPU decision, the workers and
whether they fit, the per-worker batch, whether every node sees the storage folder and the
dataset, the W&B mode each node would use, and the Python environment (the job's runtime
env, and the packages each node has). Exit code 0 when the plan is viable, 2 with every
reason when it is not.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.driver.cluster_check import plan_workers
from pipeline.driver.cluster_state import ClusterView, inspect_cluster
from pipeline.driver.node_probe import Answer, shared_path_problems
from pipeline.store.locations import is_uri
from pipeline.train.derived import derive
from pipeline.train.distributed import backend_for


def storage_problem(uri: str) -> str | None:
    """Why the driver cannot reach a storage URI (Ray opens it the same way), or None."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        fs.get_file_info(path)  # a folder not there yet is fine: Ray creates it
    except Exception as e:
        return f"checkpoint.storage_path={uri} is not reachable from the driver: {type(e).__name__}: {e}"
    return None


def describe_runtime_env(env: dict[str, Any]) -> list[str]:
    """The job's runtime env in a few lines; environment variables by name only (they hold secrets)."""
    if not env:
        return [
            "environment: no runtime env (not inside a submitted job, or submitted without one): "
            "workers use each node's own Python and packages, as in its image"
        ]
    lines = ["environment: the job's runtime env (what every worker gets):"]
    for key in sorted(env):
        value = env[key]
        if key in ("pip", "uv"):
            packages = value.get("packages", []) if isinstance(value, dict) else value
            shown = list(packages) if isinstance(packages, list) else [str(packages)]
            lines.append(f"  {key}: {len(shown)} requirement(s): {', '.join(map(str, shown[:8]))}")
        elif key == "env_vars":
            lines.append(f"  env_vars: {', '.join(sorted(value))} (values not shown)")
        elif key in ("working_dir", "image_uri", "container", "conda", "py_modules", "py_executable"):
            lines.append(f"  {key}: {value}")
        elif key not in ("_ray_commit", "config"):
            lines.append(f"  {key}: set")
    return lines


def describe_nodes(view: ClusterView, answers: dict[str, Answer]) -> list[str]:
    """Each distinct Python environment on the nodes, with the nodes that have it."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for node in view.nodes:
        a = answers.get(node.node_id)
        if a is not None and not a.error:
            groups[(a.python, a.packages)].append(node.ip)
    lines = []
    for (python, packages), ips in groups.items():
        shown = ", ".join(f"{k} {v}" for k, v in packages)
        lines.append(f"  on {len(ips)} node(s) ({', '.join(sorted(set(ips)))}): Python {python}; {shown}")
    return lines


def describe_wandb(cfg: Config, view: ClusterView, answers: dict[str, Answer]) -> tuple[list[str], list[str]]:
    """(lines, warnings): the W&B mode rank 0 would use on each node, and whether a key is there."""
    modes: dict[str, int] = defaultdict(int)
    keyless = []
    for node in view.nodes:
        a = answers.get(node.node_id)
        if a is None or a.error:
            continue
        modes[a.wandb_mode] += 1
        if a.wandb_mode == "online" and not a.wandb_key:
            keyless.append(node.ip)
    shown = ", ".join(f"{m} on {k} node(s)" for m, k in sorted(modes.items())) or "unknown"
    lines = [
        f"W&B: tracking.mode={cfg.tracking.mode}; rank 0 would log {shown} (WANDB_MODE on the node wins)"
    ]
    warnings = []
    if keyless:
        warnings.append(
            f"W&B is online but {', '.join(keyless)} has no WANDB_API_KEY (nor a netrc entry): rank 0 there "
            "would log offline instead"
        )
    return lines, warnings


def dry_run(cfg: Config) -> int:
    """Print the plan for ``cfg`` on the cluster this driver joins; 0 when viable, 2 when not."""
    from pipeline.driver.ray_runner import connect, quiet_ray_env

    quiet_ray_env()
    address = connect(cfg)
    import ray

    view = inspect_cluster(address)
    lines = ["", "== dry run: what `train` would do (nothing is trained) =="] + view.describe()
    problems: list[str] = []
    warnings: list[str] = []
    try:
        plan = plan_workers(cfg.cluster, view)
        backend = backend_for(plan.use_gpu)
        lines += [f"GPUs: {'yes' if plan.use_gpu else 'no'} ({plan.gpu_reason}), backend {backend}"]
        lines += [f"workers: {plan.placement}"]
        warnings += plan.warnings
    except ConfigError as e:
        problems.append(str(e))
    for world in sorted(
        {cfg.cluster.min_workers, cfg.cluster.max_workers}
    ):  # pipeline.train.derived.derive's split
        d = derive(cfg, max(cfg.optim.batch_size, 1), world)
        micro = f" (micro-batch {d.micro_batch} x {d.accum_steps})" if d.accum_steps > 1 else ""
        lines.append(
            f"batch: global {cfg.optim.batch_size} = {world} worker(s) x {d.worker_share}{micro}; "
            f"eval {d.per_worker_eval_batch} per worker"
        )

    path_problems, answers = shared_path_problems(cfg, view.nodes)
    problems += path_problems
    answered = sum(1 for a in answers.values() if not a.error)
    storage = cfg.checkpoint.storage_path
    if is_uri(storage):
        trouble = storage_problem(storage)
        lines.append(
            f"storage: {storage} (URI) " + ("NOT reachable" if trouble else "reachable from the driver")
        )
        if trouble:
            problems.append(trouble)
    else:
        seen = sum(1 for a in answers.values() if a.marker_seen)
        lines.append(f"storage: {storage} (local) visible from {seen} of {len(view.nodes)} node(s) up")
    if is_uri(cfg.data.root):
        lines.append(f"data: {cfg.data.root} (URI; read by the preflight above from the driver)")
    else:
        seen = sum(1 for a in answers.values() if a.data_seen)
        lines.append(f"data: {cfg.data.root} (local) present on {seen} of {len(view.nodes)} node(s) up")
    if view.scaling in ("autoscaling", "unknown") and not (is_uri(storage) and is_uri(cfg.data.root)):
        warnings.append(
            "nodes the autoscaler starts later are not checked: a local storage path or data root must be "
            "mounted on them by the node setup (the cluster template or the pod spec)"
        )

    wandb_lines, wandb_warnings = describe_wandb(cfg, view, answers)
    lines += wandb_lines
    warnings += wandb_warnings
    lines += describe_runtime_env(dict(ray.get_runtime_context().runtime_env or {}))
    lines += describe_nodes(view, answers)
    lines.append(f"nodes answering the check: {answered} of {len(view.nodes)}")
    lines += [f"warning: {w}" for w in warnings]
    if problems:
        lines += ["", "NOT viable:"] + [f"  - {p}" for p in problems]
    else:
        lines += ["", "viable: `train` without --dry-run would start the workers above"]
    print("\n".join(lines), flush=True)
    return 2 if problems else 0
