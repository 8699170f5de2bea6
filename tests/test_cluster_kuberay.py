"""The KubeRay manifests (cluster/kuberay) hold what they promise, checked without a Kubernetes API.

- They parse and carry the GPU limits, the ImageNet PVC, /dev/shm in memory, the W&B key from a
  Secret, token auth through ``authOptions``, and the training entrypoint.
- The worker pods keep the node's shard cache on a local emptyDir sized for ImageNet, where the
  job's ``data.cache_dir`` points.
- The RayJob retries a failed attempt on a new cluster with a fixed run in a bucket; the
  RayCluster's optional GCS fault tolerance is what the operator accepts; cluster/README's
  "What survives what" says what the templates do.
- Security: no secret value and no public service in any manifest.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from cluster_files import CLUSTER, KUBE_YAMLS, PROJECT_IMAGE, RAY_VERSION, ROOT, pyproject, rel, runtime_env

from pipeline.config import load_config


def kube_docs() -> dict[str, list[dict]]:
    return {rel(p): [d for d in yaml.safe_load_all(p.read_text()) if d] for p in KUBE_YAMLS}


def find(kind: str) -> list[dict]:
    return [d for docs in kube_docs().values() for d in docs if d["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], d["spec"]) for d in find("RayCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in find("RayJob")]
    return specs


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(container: dict, name: str) -> dict | None:
    entry = env_map(container).get(name)
    return entry and entry.get("valueFrom", {}).get("secretKeyRef")


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return pods


def test_kube_manifests_parse_and_hold_every_kind():
    docs = kube_docs()
    assert all(docs.values()), docs.keys()
    assert find("RayCluster") and find("RayJob") and find("PersistentVolumeClaim")
    for docs_in_file in docs.values():
        for d in docs_in_file:
            assert d["apiVersion"] and d["metadata"]["name"]


def test_ray_clusters_have_gpu_workers_shm_pvc_and_secrets():
    claims = {d["metadata"]["name"] for d in find("PersistentVolumeClaim")}
    specs = ray_cluster_specs()
    assert len(specs) == 2
    for name, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        # Token auth through KubeRay's authOptions, from the Secret `make submit`'s token lives in.
        assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth"}, name
        version = pyproject()["project"]["version"]
        for group_name, pod in pod_specs(spec):
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            match = PROJECT_IMAGE.match(container["image"])
            assert match and match["tag"] == version, container["image"]
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            # /dev/shm backed by memory.
            shm = volumes[mounts["/dev/shm"]["name"]]
            assert shm["emptyDir"]["medium"] == "Memory", (name, group_name)
            # ImageNet from the shared claim, read-only, where a pod mounts it (the RayJob reads
            # the sharded layout from the bucket instead).
            if name == "resnet":
                assert "/mnt/imagenet" in mounts, (name, group_name)
            if "/mnt/imagenet" in mounts:
                data = mounts["/mnt/imagenet"]
                claim = volumes[data["name"]]["persistentVolumeClaim"]
                assert claim["claimName"] in claims and data["readOnly"] is True
            # W&B key only from a Secret; the Ray token only from the operator (a variable set
            # here would win over the one authOptions injects).
            assert secret_ref(container, "WANDB_API_KEY"), (name, group_name)
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & env_map(container).keys(), (name, group_name)
            if group_name != "head":
                limits = container["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) == 8
                assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        # The operator gives the autoscaler sidecar the token too.
        assert "env" not in spec["autoscalerOptions"], name


def env_entries(node) -> list[dict]:
    """Every ``{name: ..., value/valueFrom: ...}`` mapping anywhere in a manifest."""
    if isinstance(node, dict):
        found = [node] if "name" in node and ("value" in node or "valueFrom" in node) else []
        return found + [e for v in node.values() for e in env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in env_entries(v)]
    return []


def test_no_secret_value_or_public_service_in_manifests():
    secret_vars = {"WANDB_API_KEY", "RAY_AUTH_TOKEN"}
    for path in KUBE_YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            text = json.dumps(doc)
            assert "LoadBalancer" not in text and "NodePort" not in text, path
            assert doc["kind"] != "Secret", path  # Secrets are created by hand (README)
            for entry in env_entries(doc):
                if entry["name"] in secret_vars:
                    assert "value" not in entry and entry["valueFrom"]["secretKeyRef"], (path, entry)


def test_rayjob_runs_the_training_entrypoint_with_the_runtime_env():
    (job,) = find("RayJob")
    spec = job["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "train"]
    config_path, overrides = words[words.index("--config") + 1], words[words.index("--config") + 2 :]
    assert "data.root=s3://REPLACE_ME-bucket/imagenet-shards" in overrides
    assert "data.cache_dir=/mnt/shard-cache" in overrides
    if not any((ROOT / "configs" / "imagenet").glob("*.yaml")):
        load_config(None, overrides)  # keys and types at least, until the ImageNet configs land
        pytest.skip("configs/imagenet/ holds no configs yet")
    cfg = load_config(ROOT / config_path, overrides)
    assert cfg.cluster.num_workers % 8 == 0 and cfg.cluster.use_gpu == "true"
    # The pods' image holds the packages: the job's runtime env installs none, and sets the
    # same variables as cluster/runtime_env.yaml.
    job_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not {"pip", "uv", "conda"} & job_env.keys()
    assert job_env["env_vars"] == runtime_env()["env_vars"]
    assert job_env["working_dir"].endswith(f"/v{pyproject()['project']['version']}.zip")


def test_rayjob_retries_a_lost_head_on_a_new_cluster_and_resumes_the_same_run():
    """A failed attempt gets a new RayCluster and the same entrypoint (KubeRay v1.7.0's
    rayjob_controller.go); it resumes only if the run's folder is fixed and in a bucket, and
    the operator refuses the combinations its validation.go rejects."""
    (job,) = find("RayJob")
    spec = job["spec"]
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] > 0
    assert spec["shutdownAfterJobFinishes"] is True
    # SidecarMode: a lost head pod fails the attempt at once (it is not restarted in place);
    # KubeRay refuses a submitter pod template or config with it, a head restartPolicy other
    # than Never, and backoffLimit with clusterSelector or InteractiveMode.
    assert spec["submissionMode"] == "SidecarMode"
    assert not {"submitterPodTemplate", "submitterConfig", "clusterSelector"} & spec.keys()
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head_pod.get("restartPolicy", "Never") == "Never"
    words = shlex.split(spec["entrypoint"])
    overrides = words[words.index("--config") + 2 :]
    assert [w for w in overrides if w.startswith("name=")] == [f"name={job['metadata']['name']}"]
    cfg = load_config(ROOT / words[words.index("--config") + 1], overrides)
    assert re.match(r"^(s3|gs)://", cfg.checkpoint.storage_path), "a retry's new cluster sees only the bucket"
    assert cfg.tracking.mode != "disabled"  # the checkpoint carries the W&B run id the retry logs into


def uncommented_block(text: str, key: str) -> dict:
    """The YAML a template holds commented out under ``# key:``, uncommented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"# {key}:")
    indent = lines[start].index("#")
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * indent + "#   "):
            break
        block.append(line)
    return yaml.safe_load("\n".join(line[indent + 2 :] for line in block))


def test_raycluster_offers_gcs_fault_tolerance_the_operator_accepts():
    """Optional and off by default; uncommented, it is what KubeRay v1.3.0+ takes (a Redis
    address, the password from a Secret), and nothing else in the template sets what the
    operator then refuses (utils/validation.go: the ft annotation, redis-password, the env)."""
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    (cluster,) = find("RayCluster")
    assert "gcsFaultToleranceOptions" not in cluster["spec"]
    ft = uncommented_block(path.read_text(), "gcsFaultToleranceOptions")["gcsFaultToleranceOptions"]
    assert set(ft) == {"redisAddress", "redisPassword"} and ft["redisAddress"]
    assert set(ft["redisPassword"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert "ray.io/ft-enabled" not in (cluster["metadata"].get("annotations") or {})
    assert "redis-password" not in cluster["spec"]["headGroupSpec"]["rayStartParams"]
    for _, pod in pod_specs(cluster["spec"]):
        for container in pod["containers"]:
            assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & env_map(container).keys()


def test_what_survives_what_says_what_the_templates_do():
    text = (CLUSTER / "README.md").read_text()
    section = text[text.index("## What survives what") :]
    section = section[: section.index("\n## ", 1)]
    (job,) = find("RayJob")
    assert f"`backoffLimit` ({job['spec']['backoffLimit']})" in section
    assert f"`submissionMode: {job['spec']['submissionMode']}`" in section
    assert "kubectl replace --force -f cluster/kuberay/rayjob.yaml" in section
    assert "gcsFaultToleranceOptions" in section and "make submit" in section


def quantity_bytes(q: str) -> float:
    """A Kubernetes quantity (``200Gi``, ``240G``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(q)).groups()
    return float(number) * units.get(unit, 1)


def shard_cache_volume(pod: dict, container: dict, mount_path: str) -> dict:
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mount_path in mounts, mounts.keys()
    volumes = {v["name"]: v for v in pod["volumes"]}
    return volumes[mounts[mount_path]["name"]]


def test_worker_pods_keep_the_shard_cache_on_a_local_emptydir_sized_for_imagenet():
    """Every GPU worker pod mounts a disk-backed emptyDir (kubelet's local storage, not memory,
    not the container's writable layer) where the job's data.cache_dir points; the pod asks for
    that much ephemeral storage, and data.cache_limit_gb keeps the cache under the volume's
    sizeLimit (the cache's default limit reads the whole disk's free space)."""
    (job,) = find("RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    overrides = words[words.index("--config") + 2 :]
    cfg = load_config(ROOT / words[words.index("--config") + 1], overrides)
    assert cfg.data.root.startswith("s3://") and cfg.data.root.endswith("imagenet-shards")
    # The RayCluster's documented `make submit` arguments name the same folder and limit.
    header = (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert (
        f"data.cache_dir={cfg.data.cache_dir}" in header
        and f"data.cache_limit_gb={cfg.data.cache_limit_gb:g}" in header
    )
    for name, spec in ray_cluster_specs():
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            volume = shard_cache_volume(pod, container, cfg.data.cache_dir)
            assert set(volume) == {"name", "emptyDir"} and "medium" not in volume["emptyDir"], (name, volume)
            size = quantity_bytes(volume["emptyDir"]["sizeLimit"])
            dataset = 148e9  # ImageNet's shards (cluster/README.md)
            assert dataset < cfg.data.cache_limit_gb * 1e9 < size, (name, size)
            resources = container["resources"]
            request = quantity_bytes(resources["requests"]["ephemeral-storage"])
            limit = quantity_bytes(resources["limits"]["ephemeral-storage"])
            assert size < request <= limit, (name, request, limit)
    # The RayJob reads the bucket only: no pod waits for the shared claim.
    for _, pod in pod_specs(job["spec"]["rayClusterSpec"]):
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_worker_pods_drain_their_node_as_a_preemption_before_they_go():
    """A deleted worker pod (a spot reclaim's node termination handler, a scale-down) first drains
    its Ray node as a preemption with a deadline, then waits it out inside the grace period: Ray
    Train's workers get the notice and checkpoint (pipeline/train/preemption.py)."""
    for name, spec in ray_cluster_specs():
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            (hook,) = [c["lifecycle"]["preStop"]["exec"]["command"] for c in pod["containers"]]
            script = hook[-1]
            deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", script)[1])
            assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in script, (name, script)
            assert f"sleep {deadline}" in script, (name, script)
            assert deadline < pod["terminationGracePeriodSeconds"], (name, deadline)
