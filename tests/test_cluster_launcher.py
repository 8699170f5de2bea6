"""The cluster launcher templates (cluster/aws, cluster/gcp) hold what they promise, checked
without a cloud.

- They validate against the cluster-config schema Ray 2.60 ships (``ray/autoscaler/ray-schema.json``)
  and Ray's own ``validate_config``.
- GPU nodes run the project's image at pyproject's version, with a large /dev/shm and shared
  storage; they scale to zero when idle.
- Security: token auth, the dashboard on loopback only, no secret in a file.
- AWS GPU nodes get EFA interfaces in a form Ray's own AWS bootstrap accepts.
- The shard cache sits on the nodes' local NVMe (AWS instance store, GCP local SSD): the host
  command that builds and mounts it, run against stubs, and the containers' mount.
- Each worker node runs the spot-notice watcher (cluster/scripts/spot_notice.py), which drains
  the node as a preemption on its cloud's notice: run here against a fake metadata server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from cluster_files import CLUSTER, LAUNCHER_YAMLS, PROJECT_IMAGE, pyproject, rel
from ray.autoscaler._private.util import validate_config


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


# Where each template mounts the node's local NVMe, and how it names its disks to the stubs below.
LOCAL_DISKS = {
    "aws": ("/opt/dlami/nvme", "lsblk", "/dev/nvme0n1 Amazon Elastic Block Store\n"
            "/dev/nvme1n1 Amazon EC2 NVMe Instance Storage\n/dev/nvme2n1 Amazon EC2 NVMe Instance Storage"),
    "gcp": ("/mnt/localssd", "ls", "/dev/disk/by-id/google-local-nvme-ssd-0\n/dev/disk/by-id/google-local-nvme-ssd-1"),
}  # fmt: skip


def run_with_stubs(command: str, tmp_path: Path, lister: str, listing: str) -> list[str]:
    """Run a template's host command with ``sudo``, ``mountpoint`` (nothing mounted), ``mdadm``
    and the disk lister replaced by stubs; the privileged commands it would run, one per line."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sudo.log"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        "sudo": f'echo "$*" >> {log}',
        "mountpoint": "exit 1",
        "mdadm": "exit 0",
        lister: f"printf '%s\\n' '{listing}'",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=rel)
def test_launcher_puts_the_shard_cache_on_local_nvme(path, tmp_path):
    """The host's local NVMe disks become one RAID 0 mounted where every container's
    /mnt/shard-cache comes from (``data.cache_dir=/mnt/shard-cache``, as the header's ARGS say)."""
    config = yaml.safe_load(path.read_text())
    mount, lister, listing = LOCAL_DISKS[path.parent.name]
    mapping = next(o for o in config["docker"]["run_options"] if o.endswith(":/mnt/shard-cache"))
    host_folder = mapping.split()[1].split(":")[0]
    assert host_folder == f"{mount}/shard-cache"
    assert "data.cache_dir=/mnt/shard-cache" in path.read_text()
    init = config["initialization_commands"]
    (setup,) = [c for c in init if "mdadm --create" in c]
    ran = run_with_stubs(setup, tmp_path, lister, listing)
    disks = listing.split() if lister == "ls" else [line.split()[0] for line in listing.splitlines()[1:]]
    (create,) = [r for r in ran if r.startswith("mdadm --create")]
    assert create.endswith(f"--raid-devices=2 {' '.join(disks)}"), create  # the EBS boot disk left out
    assert any(r.startswith("mkfs.") and r.endswith("/dev/md/shard-cache") for r in ran), ran
    assert any(r.startswith("mount ") and r.endswith(f"/dev/md/shard-cache {mount}") for r in ran), ran
    # Then the folder the containers mount, writable by the container's user.
    (folder,) = [c for c in init if f"{mount}/shard-cache" in c]
    assert f"chmod 1777 {mount}/shard-cache" in folder
    assert init.index(setup) < init.index(folder)


def test_gcp_a2_nodes_get_local_ssd():
    config = yaml.safe_load((CLUSTER / "gcp" / "cluster.yaml").read_text())
    disks = config["available_node_types"]["gpu_a2"]["node_config"]["disks"]
    scratch = [d for d in disks if d.get("type") == "SCRATCH"]
    assert len(scratch) == 8  # the one count a2-highgpu-8g takes
    assert all(
        d["interface"] == "NVME" and d["initializeParams"]["diskType"].endswith("/local-ssd") for d in scratch
    )
    zone = config["provider"]["availability_zone"]
    assert all(d["initializeParams"]["diskType"].startswith(f"zones/{zone}/") for d in scratch)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=rel)
def test_worker_nodes_start_the_spot_notice_watcher_for_their_cloud(path):
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"] == {"~/spot_notice.py": "cluster/scripts/spot_notice.py"}
    start = config["worker_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(start) if "ray start" in c)
    watcher = f"nohup python ~/spot_notice.py --cloud {path.parent.name} "
    assert any(c.startswith(watcher) and c.endswith("&") for c in start[ray_start + 1 :]), start


class _Metadata:
    """A cloud's instance metadata on 127.0.0.1: no notice for the first ``quiet`` reads, then one."""

    def __init__(self, cloud: str, quiet: int, reclaim_in_s: float):
        import http.server
        import threading
        import time as clock

        reads, when = [0], clock.strftime("%Y-%m-%dT%H:%M:%SZ", clock.gmtime(clock.time() + reclaim_in_s))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_PUT(self):  # IMDSv2's token
                self._send(200, b"token")

            def do_GET(self):
                reads[0] += 1
                notice = reads[0] > quiet
                if cloud == "aws":
                    ok = self.headers.get("X-aws-ec2-metadata-token") == "token" and notice
                    self._send(
                        200, json.dumps({"action": "terminate", "time": when}).encode()
                    ) if ok else self._send(404, b"")
                else:
                    assert self.headers.get("Metadata-Flavor") == "Google"
                    self._send(200, b"TRUE" if notice else b"FALSE")

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize(("cloud", "left"), [("aws", range(100, 122)), ("gcp", range(25, 31))])
def test_spot_notice_drains_the_node_as_a_preemption_with_the_time_left(tmp_path, cloud, left):
    metadata = _Metadata(cloud, quiet=2, reclaim_in_s=120)
    fake_ray, calls = tmp_path / "ray", tmp_path / "calls"
    fake_ray.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake_ray.chmod(0o755)
    script = CLUSTER / "scripts" / "spot_notice.py"
    cmd = [
        sys.executable,
        str(script),
        "--cloud",
        cloud,
        "--metadata-url",
        metadata.url,
        "--poll-s",
        "0.05",
        "--ray",
        str(fake_ray),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    metadata.server.shutdown()
    assert proc.returncode == 0, proc.stderr
    (call,) = calls.read_text().splitlines()
    assert call.startswith("drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message"), call
    assert int(call.rsplit(" ", 1)[1]) in left, call  # the seconds to the reclaim, told once
