"""Ray nodes on this one machine, as cluster/README's rehearsal starts them: the one harness of
the node-loss drill (cluster/drill.py) and the cluster tests.

    nodes = LocalNodes("e2e")
    nodes.start("head", head=True, num_cpus=2)
    nodes.start("worker", num_cpus=2)          # or hide=[folder], private_tmp=True: a "remote" node
    nodes.wait_alive({"head", "worker"})
    subprocess.run([...], env=nodes.client_env)  # make submit ADDRESS=nodes.address, ray job ...
    nodes.stop()

Each node is ``.venv/bin/ray start --block``, a child of this process, on 127.0.0.1 with a free
port for every Ray port (so it runs beside any other Ray here), its own ``--temp-dir``, a
100 MB object store, token auth on (the token in a file named by ``RAY_AUTH_TOKEN_PATH``), and a
custom resource ``<tag>_<name>`` naming it; its output goes to ``<root>/<name>.log`` and
``start`` returns once it says "Ray runtime started". The head serves the dashboard on
127.0.0.1 (the Jobs API, and the state API this harness asks which nodes are alive: those
questions live in cluster/dashboard_client.py, which ``LocalNodes`` inherits). The venv's
``bin`` is NOT on the nodes' PATH unless ``venv_on_path=True``: a job's bare ``python`` is then
the system's, as on nodes started with ``.venv/bin/ray start`` from a plain shell (``make
submit`` runs ``cluster/scripts/job_python.sh``, which finds the raylet's Python).

A node can run in its own mount namespace (``unshare --mount``, root only), as if on another
machine: ``hide`` mounts an empty tmpfs over folders, ``private_tmp`` a tmpfs over ``/tmp``
(the checkout and the venv stay visible; the node gets its own ``$HOME`` and Ray temp dir there,
and the token itself in ``RAY_AUTH_TOKEN``, since its file lies in the host's ``/tmp``). The
harness can also start a local S3 server (``start_s3``, optionally counting requests) for runs
without a shared filesystem.

Every process started with ``client_env`` or as a node carries ``RESNET_LOCALNODES=<root>`` in
its environment, a node's also ``RESNET_LOCALNODES_NODE=<root>:<name>``. Teardown kills those
and their descendants (Ray's dashboard modules rewrite their environment block for their
process titles, so the marker alone misses them), nothing else; never ``ray stop``.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

# Beside this module in cluster/; JOB_ENDED is re-exported for the harness's callers.
from dashboard_client import JOB_ENDED as JOB_ENDED
from dashboard_client import DashboardClient

VENV_BIN = Path(sys.executable).parent
CHECKOUT = Path(__file__).resolve().parents[1]
RAY = str(VENV_BIN / "ray")
MARKER = "RESNET_LOCALNODES"
NODE_MARKER = "RESNET_LOCALNODES_NODE"


def ends_with_its_starter() -> None:
    """In a child before exec: SIGTERM it when the process that started it dies (Linux's
    PR_SET_PDEATHSIG). Without it a drill or test killed by a timeout leaves its whole cluster
    running on the machine (``ray start --block`` stops its raylet and GCS on SIGTERM, not when
    its parent goes), and every later test runs beside it. The node's ``unshare`` and ``sh``
    exec into ``ray start``, so the signal reaches it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


OBJECT_STORE_BYTES = 100 * 1024**2

# Runs inside the node's new mount namespace, then becomes `ray start`. A checkout (or venv)
# that itself lives under /tmp must stay visible under the private /tmp: hold it elsewhere,
# mount the tmpfs, then put it back at the same path.
NAMESPACE_SCRIPT = r"""
set -e
IFS=:
if [ -n "$LOCALNODES_HOLD" ]; then
  hold=$(mktemp -d "$LOCALNODES_HOLD/node.XXXXXX")
  i=0; for d in $LOCALNODES_KEEP; do mkdir -p "$hold/$i"; mount --bind "$d" "$hold/$i"; i=$((i+1)); done
  mount -t tmpfs -o size=4g,mode=1777 localnodes-tmp /tmp
  i=0; for d in $LOCALNODES_KEEP; do mkdir -p "$d"; mount --bind "$hold/$i" "$d"; i=$((i+1)); done
fi
for d in $LOCALNODES_HIDE; do if [ -d "$d" ]; then mount -t tmpfs -o size=1m,mode=0755 localnodes-hidden "$d"; fi; done
unset IFS
mkdir -p "$HOME"
exec "$@"
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pids_with_env(entry: str) -> list[int]:
    """Processes (other than this one) whose environment holds the exact ``entry``."""
    needle, pids = entry.encode(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def descendants(pids: Iterable[int]) -> set[int]:
    """``pids`` and all their children, grandchildren, ... (from /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def can_unshare_mounts() -> bool:
    """Whether this process may give a node its own mount namespace (root and util-linux's unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "none", "/mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


class LocalNodes(DashboardClient):
    """A head and joined nodes, each a ``ray start --block`` child of this process; what its
    dashboard says about them (the Jobs, state and Ray Train APIs) comes from ``DashboardClient``.

    Args:
        tag: names the temp dir (``/tmp/<tag>-*``) and the nodes' custom resources (``<tag>_<name>``).
        venv_on_path: put this venv's ``bin`` first on the nodes' PATH (the README's rehearsal does not).
        env: extra environment of every node (and not of the clients).
    """

    def __init__(self, tag: str, *, venv_on_path: bool = False, env: dict[str, str] | None = None):
        self._ports = free_ports(64)
        self.gcs_port = self._ports.pop()
        super().__init__(tag, dashboard_port=self._ports.pop(), token=secrets.token_hex(32))
        # Short path: Ray puts unix sockets under a node's temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp"))
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.hold: Path | None = None  # outside /tmp: where a private-/tmp node holds the checkout
        path = os.environ.get("PATH", "")
        scrub = ("RAY_", "WANDB_", "AWS_")
        base = {k: v for k, v in os.environ.items() if not k.startswith(scrub) and k != "PYTHONPATH"}
        # What a client (make submit, ray job ..., a driver) needs: token mode and the token file.
        self.client_env = {
            **base,
            "PATH": os.pathsep.join([str(VENV_BIN), path]),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: str(self.root),
        }
        system_path = os.pathsep.join(
            p for p in path.split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()
        )
        self.node_env = {
            **self.client_env,
            "PATH": self.client_env["PATH"] if venv_on_path else system_path,
            "RAY_DEDUP_LOGS": "0",
            # Ray Train's placement-group cleaner asks the state API with no address; Ray then
            # looks for *the* GCS on this host, and with other Ray instances running here (other
            # tests, other users) it dies with "Found multiple active Ray instances". A real
            # node hosts one Ray; here the address is named.
            "RAY_API_SERVER_ADDRESS": self.address,
            **(env or {}),
        }
        self.nodes: dict[str, subprocess.Popen] = {}
        self.private: set[str] = set()  # nodes with their own /tmp
        self.s3: subprocess.Popen | None = None
        self.s3_endpoint = ""

    def port(self) -> str:
        """A port that was free when this cluster was made and that no node of it uses."""
        return str(self._ports.pop())

    # ------------------------------------------------------------ object storage

    def start_s3(self, bucket: str, counted: bool = False, faults: tuple[str, ...] = ()) -> dict[str, str]:
        """A local S3 server (moto's server mode) holding an empty ``bucket``; returns the AWS
        environment that points a client (pyarrow, boto3, a job's ``env_vars``) at it.
        ``counted``: the same moto behind ``pipeline.bench.s3_latency`` (no added latency), which
        counts requests by kind (``s3_counts``), with ``faults`` (its flags, ``Faults.to_args``)."""
        endpoint = f"http://127.0.0.1:{self.port()}"
        self.s3_endpoint = endpoint
        aws = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on a laptop
        }
        with open(self.root / "s3.log", "w") as log:
            port = endpoint.rsplit(":", 1)[1]
            cmd = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", port]
            if counted:  # `python -m pipeline...` of this checkout (its root is the cwd)
                cmd = [sys.executable, "-m", "pipeline.bench.s3_latency", "--latency-ms", "0", "--port", port,
                       *faults]  # fmt: skip
            self.s3 = subprocess.Popen(
                cmd, env=self.client_env, cwd=CHECKOUT, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=ends_with_its_starter,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if self.s3.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "s3.log").read_text()[-2000:]
                    raise RuntimeError(f"the S3 server did not start:\n{log}") from None
                time.sleep(0.3)
        import pyarrow.fs

        pyarrow.fs.S3FileSystem(
            access_key="local", secret_key="local", region="us-east-1", scheme="http",
            endpoint_override=endpoint.removeprefix("http://"), allow_bucket_creation=True,
        ).create_dir(bucket)  # fmt: skip
        return aws

    def s3_counts(self) -> dict[str, int]:
        """The requests a ``counted`` S3 server has answered, by kind (``GET.tar``: GETs of tar objects)."""
        with urllib.request.urlopen(f"{self.s3_endpoint}/__latency/counts", timeout=10) as r:
            return json.loads(r.read())

    # ------------------------------------------------------------ nodes

    def start(
        self,
        name: str,
        *,
        head: bool = False,
        num_cpus: int = 1,
        hide: Iterable[Path] = (),
        private_tmp: bool = False,
        env: dict[str, str] | None = None,
        timeout: float = 180,
    ) -> subprocess.Popen:
        """Start node ``name`` and return once it is up; ``hide`` and ``private_tmp`` give it its
        own mount namespace (see the module's docstring)."""
        env = {**self.node_env, NODE_MARKER: f"{self.root}:{name}", **(env or {})}
        hide = [str(p) for p in hide]
        temp = "/tmp/ray" if private_tmp else str(self.root / name)
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--resources", json.dumps({self.resource(name): 1}),
            "--temp-dir", temp, "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--node-manager-port", self.port(), "--object-manager-port", self.port(),
            "--dashboard-agent-listen-port", self.port(), "--dashboard-agent-grpc-port", self.port(),
            "--runtime-env-agent-port", self.port(), "--metrics-export-port", self.port(),
        ]  # fmt: skip
        if head:
            cmd += [
                "--head", "--port", str(self.gcs_port), "--ray-client-server-port", self.port(),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            ]  # fmt: skip
        else:
            cmd += ["--address", self.gcs]
        if private_tmp:
            if self.hold is None:
                self.hold = Path(tempfile.mkdtemp(prefix=f"{self.tag}-hold-", dir="/var/tmp"))
            keep = {CHECKOUT, Path(sys.prefix)}  # the checkout, the venv
            env.update(
                LOCALNODES_HOLD=str(self.hold),
                LOCALNODES_KEEP=":".join(str(p) for p in keep if Path("/tmp") in p.parents),
                HOME="/tmp/home",  # inside the private /tmp: nothing of the host's home
                RAY_AUTH_TOKEN=self.token,  # the token file lies in the host's /tmp, hidden here
            )
            env.pop("RAY_AUTH_TOKEN_PATH")
            self.private.add(name)
        if hide or private_tmp:
            env["LOCALNODES_HIDE"] = ":".join(hide)
            namespace = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_SCRIPT]
            cmd = [*namespace, name, *cmd]
        with open(self.root / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                cmd, env=env, cwd="/" if private_tmp else self.root, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=ends_with_its_starter,
            )  # fmt: skip
        self.nodes[name] = proc
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited {proc.returncode}"
                    if proc.poll() is not None
                    else f"not up after {timeout:.0f} s"
                )
                raise RuntimeError(f"ray start ({name}) {why}:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)
        return proc

    def log(self, name: str) -> str:
        """What node ``name``'s ``ray start`` printed."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def view(self, name: str) -> Path:
        """Node ``name``'s filesystem as its processes see it (its mount namespace)."""
        return Path(f"/proc/{self.nodes[name].pid}/root")

    def isolation(self, hidden: Iterable[Path]) -> tuple[bool, str]:
        """(ok, detail): whether every live node sees its own /tmp (none sees this harness's root)
        and ``hidden`` folders empty."""
        problems, hidden = [], list(hidden)
        live = [name for name, proc in self.nodes.items() if proc.poll() is None]
        for name in live:
            view = self.view(name)
            if (view / self.root.relative_to("/")).exists():
                problems.append(f"{name} sees the host's /tmp")
            for d in hidden:
                inside = view / d.relative_to("/")
                if inside.is_dir() and any(inside.iterdir()):
                    problems.append(f"{name} sees {d}")
        names = "/, ".join(d.name for d in hidden)
        detail = "; ".join(problems) or f"{len(live)} nodes: private /tmp, no {names}/"
        return not problems and bool(live), detail

    def in_namespace(self, name: str, cmd: list[str], cwd: Path) -> list[str]:
        """``cmd`` run in node ``name``'s mount namespace (sees what the node sees), from ``cwd``."""
        return ["nsenter", "--target", str(self.nodes[name].pid), "--mount", f"--wd={cwd}", "--", *cmd]

    def copy_ray_logs(self, dest: Path) -> None:
        """Ray's own logs of every live node (its session's ``logs/``) to ``dest/<name>/``."""
        for name, proc in self.nodes.items():
            private = name in self.private
            temp = self.view(name) / "tmp/ray" if private else self.root / name
            try:  # an absolute link, meant for the node's own root
                target = os.readlink(temp / "session_latest")
            except OSError:
                continue
            logs = (self.view(name) / target.lstrip("/") if private else Path(target)) / "logs"
            if proc.poll() is None and logs.is_dir():
                shutil.copytree(logs, dest / name, dirs_exist_ok=True, ignore_dangling_symlinks=True)

    def node_pids(self, name: str) -> list[int]:
        """Every process of node ``name``: its ``ray start``, those with its marker, their descendants."""
        roots = set(pids_with_env(f"{NODE_MARKER}={self.root}:{name}"))
        proc = self.nodes.get(name)
        if proc is not None and proc.poll() is None:
            roots.add(proc.pid)
        return sorted(descendants(roots))

    def kill_node(self, name: str) -> list[str]:
        """SIGKILL every process of node ``name`` (a machine lost); returns their names."""
        killed: dict[int, str] = {}
        deadline = time.monotonic() + 20
        while (pids := self.node_pids(name)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    killed.setdefault(pid, Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
            kill_all(pids)  # a second pass catches what was being forked during the first
            time.sleep(0.2)
        self.nodes[name].wait(timeout=10)
        if self.node_pids(name):
            raise RuntimeError(f"processes of node {name} survived SIGKILL: {self.node_pids(name)}")
        return sorted(killed.values())

    def stop_node(self, name: str, timeout: float = 60) -> None:
        """Stop node ``name`` the way a node leaves (SIGTERM to its ``ray start``), then kill what is left."""
        proc = self.nodes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_all(self.node_pids(name))
        proc.wait(timeout=10)
        del self.nodes[name]

    def stop(self, keep: bool = False, grace: float = 5) -> None:
        """SIGTERM every node at once, then after ``grace`` seconds kill whatever still carries
        this cluster's marker. An idle node exits in about 2 s; a head that ran a job can spend
        more than 30 s on its graceful shutdown, which nothing here needs (its logs are written
        as it goes). ``keep``: leave the temp dir (the logs) in place."""
        live = [proc for proc in self.nodes.values() if proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name, proc in self.nodes.items():
            kill_all(self.node_pids(name))
            proc.wait(timeout=10)
        if self.s3 is not None and self.s3.poll() is None:
            self.s3.terminate()
            self.s3.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (left := self.leftover_pids()) and time.monotonic() < deadline:
            kill_all(descendants(left))
            time.sleep(0.5)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.hold is not None:
            shutil.rmtree(self.hold, ignore_errors=True)  # empty folders: the mounts died with the nodes

    def leftover_pids(self) -> list[int]:
        """Processes still carrying this cluster's marker."""
        return pids_with_env(f"{MARKER}={self.root}")
