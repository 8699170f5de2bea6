"""The cluster checks before training: ``cluster.use_gpu: auto``, worker placement, the dry run.

Simulated clusters (the sources of node types stubbed, or fed the project's own cluster
templates), then a real local Ray (``local_ray``): a local Ray decides from this machine,
a GPU run that cannot be placed fails after ``cluster.start_timeout_s`` instead of waiting
forever, and ``train --dry-run`` prints the plan.

    .venv/bin/python -m pytest -q tests/test_driver_cluster_checks.py
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ClusterConfig, ConfigError, load_config
from pipeline.driver import cluster_state
from pipeline.driver.cluster_check import check_fit, decide_gpu, plan_workers
from pipeline.driver.cluster_state import ClusterView, Node, NodeType, node_types_from_autoscaling_config

ROOT = Path(__file__).resolve().parents[1]
HEAD = Node("aa" * 28, "10.0.0.1", {"CPU": 8.0, "node:__internal_head__": 1.0}, True)
CPU_NODE = Node("bb" * 28, "10.0.0.2", {"CPU": 2.0}, False)
GPU_NODE = Node("cc" * 28, "10.0.0.3", {"CPU": 16.0, "GPU": 2.0}, False)


def cluster(**values):
    """A ``cluster`` section (its own checks only: the batch need not divide over these workers)."""
    return ClusterConfig(**values)


def launcher_view(template: str) -> ClusterView:
    """An autoscaling cluster whose node types are a cluster template's (CPU head up, GPUs at zero)."""
    types, cap = node_types_from_autoscaling_config(yaml.safe_load((ROOT / template).read_text()))
    return ClusterView("10.0.0.1:6379", (HEAD,), "autoscaling", types, cap, template)


def kuberay_cr(manifest: str) -> dict:
    """The RayCluster resource the operator would hold for one of the project's manifests."""
    doc = next(d for d in yaml.safe_load_all((ROOT / manifest).read_text()) if d)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return {"metadata": {"name": "resnet", "namespace": "ml"}, "spec": spec}


# ------------------------------------------------------------------ use_gpu: each branch


def test_local_ray_decides_from_this_machine():
    local_gpu = ClusterView(None, (GPU_NODE,), "local")
    local_cpu = ClusterView(None, (HEAD,), "local")
    assert decide_gpu(cluster(use_gpu="auto"), local_gpu)[0] is True
    assert decide_gpu(cluster(use_gpu="auto"), local_cpu)[0] is False
    with pytest.raises(ConfigError, match="no GPU that Ray can see.*RAY_ADDRESS"):
        decide_gpu(cluster(use_gpu="true"), local_cpu)


def test_gpus_up_now_mean_gpus():
    view = ClusterView("10.0.0.1:6379", (HEAD, GPU_NODE), "unknown")
    use, why, _ = decide_gpu(cluster(use_gpu="auto"), view)
    assert use and "2 GPU(s) up now" in why
    assert decide_gpu(cluster(use_gpu="false"), view)[0] is False


@pytest.mark.parametrize("template", ["cluster/aws/cluster.yaml", "cluster/gcp/cluster.yaml"])
def test_gpu_node_types_at_zero_still_mean_gpus(template):
    view = launcher_view(template)
    assert view.gpus_now == 0 and view.gpus_max == 64  # 8 nodes x 8 GPUs, under max_workers: 8
    use, why, warnings = decide_gpu(cluster(use_gpu="auto"), view)
    assert use and "up to 64" in why and template in why and not warnings


def test_cpu_only_node_types_and_fixed_clusters():
    cpu_types = (NodeType("head", {"CPU": 8.0}, 1, 1), NodeType("cpu", {"CPU": 32.0}, 10))
    autoscaling = ClusterView("h:6379", (HEAD,), "autoscaling", cpu_types, None, "launcher")
    fixed = ClusterView("h:6379", (HEAD, CPU_NODE), "fixed")
    for view, reason in ((autoscaling, "no node type"), (fixed, "fixed")):
        use, why, _ = decide_gpu(cluster(use_gpu="auto"), view)
        assert use is False and reason in why
        with pytest.raises(ConfigError, match="cluster.use_gpu=true cannot be met"):
            decide_gpu(cluster(use_gpu="true"), view)


def test_unknown_cluster_refuses_auto_and_bounds_true():
    view = ClusterView("h:6379", (HEAD,), "unknown", notes=("KubeRay: HTTPError 403",))
    with pytest.raises(ConfigError) as e:
        decide_gpu(cluster(use_gpu="auto"), view)
    message = str(e.value)
    assert "cluster.use_gpu=true" in message and "cluster.use_gpu=false" in message
    assert "h:6379" in message and "HTTPError 403" in message
    use, _, warnings = decide_gpu(cluster(use_gpu="true", start_timeout_s=120.0, start_retries=2), view)
    assert use and "start_timeout_s=120s" in warnings[0] and "start_retries=2" in warnings[0]


# ------------------------------------------------------------------ placement


def test_fit_against_node_types_and_strategies():
    view = launcher_view("cluster/aws/cluster.yaml")  # p4d: 96 CPUs, 8 GPUs, at most 8 nodes
    gpu = {"CPU": 10.0, "GPU": 1.0}
    assert "fits" in check_fit(cluster(num_workers=64), gpu, view)
    with pytest.raises(ConfigError, match="can never be placed.*room for 64 worker"):
        check_fit(cluster(num_workers=65), gpu, view)
    assert "fits" in check_fit(cluster(num_workers=8, placement_strategy="STRICT_SPREAD"), gpu, view)
    with pytest.raises(ConfigError, match="on 8 node"):
        check_fit(cluster(num_workers=9, placement_strategy="STRICT_SPREAD"), gpu, view)
    with pytest.raises(ConfigError, match="at most 8 on one"):
        check_fit(cluster(num_workers=9, placement_strategy="STRICT_PACK"), gpu, view)
    # CPUs bind before GPUs: 96 CPUs hold 4 workers of 24 CPUs.
    with pytest.raises(ConfigError, match="room for 32 worker"):
        check_fit(cluster(num_workers=33), {"CPU": 24.0, "GPU": 1.0}, view)


def test_fit_against_fixed_nodes_and_the_node_cap():
    fixed = ClusterView("h:6379", (HEAD, CPU_NODE), "fixed")  # 8 + 2 CPUs
    assert "fits" in check_fit(cluster(num_workers=10), {"CPU": 1.0}, fixed)
    with pytest.raises(ConfigError, match="cluster.num_workers"):
        check_fit(cluster(num_workers=11), {"CPU": 1.0}, fixed)
    # Two GPU types of 8 nodes each, but the launcher caps worker nodes at 8 in all.
    types = (NodeType("a", {"CPU": 8.0, "GPU": 8.0}, 8), NodeType("b", {"CPU": 8.0, "GPU": 4.0}, 8))
    capped = ClusterView("h:6379", (), "autoscaling", types, 8, "launcher")
    assert capped.gpus_max == 8 * 8  # the 8 big nodes fill the cap
    # The head is outside the cap on worker nodes.
    with_head = (NodeType("head", {"CPU": 4.0, "GPU": 1.0}, 1, 1, head=True), *types)
    assert ClusterView("h:6379", (), "autoscaling", with_head, 8, "x").gpus_max == 1 + 8 * 8
    unknown = ClusterView("h:6379", (), "unknown")
    assert unknown.richest_nodes(lambda r: 1) is None and unknown.gpus_max is None
    assert "not checked" in check_fit(cluster(num_workers=1000), {"CPU": 1.0}, unknown)


def test_plan_workers_asks_for_gpus_only_when_decided():
    view = launcher_view("cluster/aws/cluster.yaml")
    plan = plan_workers(cluster(num_workers=16, cpus_per_worker=10.0, gpus_per_worker=1.0), view)
    assert plan.use_gpu and plan.resources == {"CPU": 10.0, "GPU": 1.0}
    plan = plan_workers(cluster(use_gpu="false", num_workers=2), view)
    assert not plan.use_gpu and plan.resources == {"CPU": 1.0}


# ------------------------------------------------------------------ where node types come from


@pytest.fixture
def no_sources(monkeypatch, tmp_path):
    """Every source of node types empty: no GCS config, no launcher file, not on KubeRay."""
    monkeypatch.setattr(cluster_state, "_from_gcs_cluster_config", lambda: None)
    monkeypatch.setattr(cluster_state, "LAUNCHER_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("RAY_CLUSTER_NAME", raising=False)
    monkeypatch.delenv("RAY_CLUSTER_NAMESPACE", raising=False)
    monkeypatch.setattr(cluster_state, "alive_nodes", lambda: (HEAD,))
    return tmp_path


def test_launcher_config_on_the_head(no_sources, monkeypatch):
    config = no_sources / "ray_bootstrap_config.yaml"
    # `ray up` writes the bootstrapped config as JSON under a .yaml name.
    import json

    config.write_text(json.dumps(yaml.safe_load((ROOT / "cluster/gcp/cluster.yaml").read_text())))
    monkeypatch.setattr(cluster_state, "LAUNCHER_CONFIG", str(config))
    view = cluster_state.inspect_cluster("h:6379", local=False)
    assert view.scaling == "autoscaling" and view.gpus_max == 64 and "ray up" in view.source
    assert any("GCS cluster config" in n for n in view.notes)


@pytest.mark.parametrize("manifest", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_cluster_through_rays_own_translation(no_sources, monkeypatch, manifest):
    from ray.autoscaler._private.kuberay import node_provider

    fetched = []

    def get(self, path):
        fetched.append((self._namespace, path))
        return kuberay_cr(manifest)

    monkeypatch.setattr(node_provider.KubernetesHttpApiClient, "get", get)
    monkeypatch.setenv("RAY_CLUSTER_NAME", "resnet")
    monkeypatch.setenv("RAY_CLUSTER_NAMESPACE", "ml")
    view = cluster_state.inspect_cluster("h:6379", local=False)
    assert fetched == [("ml", "rayclusters/resnet")]
    assert view.scaling == "autoscaling" and "KubeRay" in view.source
    gpu_types = [t for t in view.node_types if t.resources.get("GPU")]
    assert [(t.resources["GPU"], t.max_count) for t in gpu_types] == [(8.0, 8)]
    assert decide_gpu(cluster(use_gpu="auto"), view)[0] is True


def test_kuberay_refused_and_read_only_status(no_sources, monkeypatch):
    import requests
    from ray.autoscaler._private.kuberay import node_provider

    def forbidden(self, path):
        raise requests.HTTPError("403 Client Error: Forbidden for url: .../rayclusters/resnet")

    monkeypatch.setattr(node_provider.KubernetesHttpApiClient, "get", forbidden)
    monkeypatch.setenv("RAY_CLUSTER_NAME", "resnet")
    monkeypatch.setenv("RAY_CLUSTER_NAMESPACE", "ml")
    # An autoscaler with real node types: what it may add is still unknown.
    monkeypatch.setattr(cluster_state, "_status_node_types", lambda: {HEAD.node_id: "headgroup"})
    view = cluster_state.inspect_cluster("h:6379", local=False, status_wait_s=0)
    assert view.scaling == "unknown"
    assert any("403" in n for n in view.notes) and any("headgroup" in n for n in view.notes)
    # The read-only monitor of a cluster started by hand names each type after its node.
    monkeypatch.setattr(cluster_state, "_status_node_types", lambda: {HEAD.node_id: f"node_{HEAD.node_id}"})
    assert cluster_state.inspect_cluster("h:6379", local=False, status_wait_s=0).scaling == "fixed"
    monkeypatch.setattr(cluster_state, "_status_node_types", lambda: None)
    view = cluster_state.inspect_cluster("h:6379", local=False, status_wait_s=0)
    assert view.scaling == "unknown" and any("no autoscaler report" in n for n in view.notes)


def test_node_type_without_resources_is_unknown(no_sources, monkeypatch):
    config = no_sources / "bootstrap.yaml"
    config.write_text(
        yaml.safe_dump({"available_node_types": {"gpu": {"max_workers": 2, "node_config": {}}}})
    )
    monkeypatch.setattr(cluster_state, "LAUNCHER_CONFIG", str(config))
    monkeypatch.setattr(cluster_state, "_status_node_types", lambda: None)
    view = cluster_state.inspect_cluster("h:6379", local=False, status_wait_s=0)
    assert view.scaling == "unknown" and any("states no resources" in n for n in view.notes)


# ------------------------------------------------------------------ a real (local) Ray


@pytest.mark.ray
def test_gcs_cluster_config_is_read(local_ray):
    """The source Ray Train consults, written the way a platform that reports it would."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu", max_count=4)
    group.resources.update({"CPU": 48, "GPU": 4})
    key, ns = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    _internal_kv_put(key, config.SerializeToString(), namespace=ns)
    try:
        types, _, source, _ = cluster_state.configured_node_types()
    finally:  # Ray Train checks every fit against this config: leave none behind for other tests
        _internal_kv_del(key, namespace=ns)
    assert source == "the cluster config in the GCS"
    assert [(t.name, t.resources["GPU"], t.max_count) for t in types] == [("gpu", 4.0, 4)]


@pytest.mark.ray
def test_local_ray_plan(local_ray, tmp_path):
    from pipeline.driver.cluster_check import check_cluster

    view = cluster_state.inspect_cluster(None)
    assert view.scaling == "local" and len(view.nodes) == 1 and cluster_state.started_here()
    cfg = load_config("configs/demo.yaml", ["cluster.num_workers=2", f"checkpoint.storage_path={tmp_path}"])
    plan = check_cluster(cfg, None)
    assert plan.use_gpu is (view.gpus_now > 0) and "fits" in plan.placement
    if view.gpus_now == 0:
        with pytest.raises(ConfigError, match="no GPU that Ray can see"):
            check_cluster(load_config("configs/demo.yaml", ["cluster.use_gpu=true"]), None)
    with pytest.raises(ConfigError, match="can never be placed"):
        check_cluster(
            load_config("configs/demo.yaml", ["cluster.num_workers=2", "cluster.cpus_per_worker=8"]), None
        )


@pytest.mark.ray
def test_gpu_start_that_cannot_be_placed_fails_after_the_timeout(local_ray, monkeypatch, tmp_path):
    """GPUs asked for on a cluster whose node types are unknown: Ray Train waits for them, but
    only cluster.start_timeout_s per attempt and cluster.start_retries times (no GPU here)."""
    import ray.train

    from pipeline.driver import cluster_check
    from pipeline.driver.ray_runner import run_on_ray

    if local_ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has a GPU: the workers would be placed")
    # run_on_ray sets Ray's variable from the config; give it back to later tests as it was.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    unknown = ClusterView("10.0.0.1:6379", cluster_state.alive_nodes(), "unknown", notes=("simulated",))
    monkeypatch.setattr(cluster_check, "inspect_cluster", lambda address: unknown)
    cfg = load_config(
        "configs/demo.yaml",
        [
            "cluster.use_gpu=true",
            "cluster.num_workers=1",
            "cluster.start_timeout_s=2",
            "cluster.start_retries=1",
            f"checkpoint.storage_path={tmp_path}",
        ],
    )
    start = time.monotonic()
    with pytest.raises(ray.train.TrainingFailedError, match="timed out after 2.0 seconds"):
        run_on_ray(cfg, worker=lambda loop_config: None)
    # Two attempts of 2 s each plus Ray's own start-up; the default would retry forever.
    assert time.monotonic() - start < 120


@pytest.mark.ray
def test_dry_run_on_the_local_ray(local_ray, tiny_imagenet, tmp_path, capsys):
    from pipeline.driver.train_cmd import main

    common = [
        "--config",
        "configs/demo.yaml",
        f"data.root={tiny_imagenet}",
        "model.num_classes=4",
        "optim.batch_size=16",
        "cluster.num_workers=2",
        f"checkpoint.storage_path={tmp_path / 'runs'}",
        "--dry-run",
    ]
    assert main(common) == 0
    out = capsys.readouterr().out
    for line in (
        "Ray: local Ray started here; 1 node(s) up",
        "GPUs: no (this machine has no GPU",
        "workers: 2 worker(s) x {CPU: 1} (PACK): fits",
        "batch: global 16 = 2 worker(s) x 8",
        "(local) visible from 1 of 1 node(s) up",
        "(local) present on 1 of 1 node(s) up",
        "W&B: tracking.mode=offline; rank 0 would log offline on 1 node(s)",
        "environment: no runtime env",
        "ray 2.60.0",
        "viable: ",
    ):
        assert line in out, (line, out[-3000:])
    assert not list((tmp_path / "runs").iterdir()), "the storage marker was left behind"
    assert not (tmp_path / "runs" / "demo").exists(), "a dry run must not train"

    # Not viable: every reason, exit 2.
    assert main([*common, "cluster.use_gpu=true", "cluster.cpus_per_worker=64"]) == 2
    out = capsys.readouterr().out
    assert "NOT viable:" in out and "no GPU that Ray can see" in out, out[-3000:]
    assert main([*common, "checkpoint.storage_path=nosuchscheme://bucket/runs"]) == 2
    out = capsys.readouterr().out
    assert "NOT viable:" in out and "nosuchscheme://bucket/runs is not reachable" in out, out[-3000:]


def test_dry_run_flag_errors(capsys):
    from pipeline.driver.train_cmd import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/demo.yaml", "--dry-run", "--no-ray"])
    assert e.value.code == 2 and "--dry-run" in capsys.readouterr().err


def test_runtime_env_is_summarised_without_secrets():
    from pipeline.driver.plan import describe_runtime_env

    env = {
        "working_dir": "gcs://_ray_pkg_abc.zip",
        "pip": {"packages": ["torch==2.14.1", "nvidia-dali-cuda130==2.4.0"]},
        "env_vars": {"WANDB_API_KEY": "secret-value-123", "NCCL_DEBUG": "WARN"},
        "image_uri": "example.com/resnet:2.60",
    }
    text = "\n".join(describe_runtime_env(env))
    assert "secret-value-123" not in text and "WANDB_API_KEY" in text
    assert "pip: 2 requirement(s): torch==2.14.1" in text and "image_uri: example.com/resnet:2.60" in text
    assert "no runtime env" in describe_runtime_env({})[0]


def test_storage_uri_reachability(tmp_path):
    from pipeline.driver.plan import storage_problem

    assert storage_problem(f"file://{tmp_path}/runs") is None
    assert "is not reachable" in storage_problem("nosuchscheme://bucket/runs")
