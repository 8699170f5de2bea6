"""The head's dashboard of a LocalNodes cluster (cluster/localnodes.py), asked over HTTP with the
cluster's token: Ray's Jobs API, its state API (which nodes are alive, where actors ran) and
Ray Train's record of its runs. LocalNodes inherits these, so the drill and the cluster tests
ask their harness about its cluster; starting and killing nodes stays in cluster/localnodes.py.

    client = DashboardClient("e2e", dashboard_port=8265, token=token)
    client.wait_alive({"head", "worker"})     # nodes named by their custom resource e2e_<name>
    client.wait_job("raysubmit_...", timeout=600)
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

JOB_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


class DashboardClient:
    """GETs on the dashboard at ``127.0.0.1:dashboard_port``.

    Args:
        tag: the cluster's tag; node ``name`` carries the custom resource ``<tag>_<name>``, which
            is how the state API's records are mapped back to node names.
        dashboard_port: the head's ``--dashboard-port``.
        token: the cluster's auth token (``RAY_AUTH_MODE=token``).
    """

    def __init__(self, tag: str, dashboard_port: int, token: str):
        self.tag = tag
        self.dashboard_port = dashboard_port
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.token = token

    def resource(self, name: str) -> str:
        """The custom resource that names node ``name``."""
        return f"{self.tag}_{name}"

    def http(self, path: str, token: str | None = "own", host: str = "127.0.0.1") -> tuple[int, bytes]:
        """(status, body) of a GET on the dashboard; ``token``: "own", another one, or None for none."""
        request = urllib.request.Request(f"http://{host}:{self.dashboard_port}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(self, path: str) -> Any:
        """The JSON of a GET on the dashboard; an OSError unless it answers 200."""
        status, body = self.http(path)
        if status != 200:
            raise OSError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def alive_nodes(self) -> list[dict]:
        """The state API's records of the nodes alive now (empty while the dashboard is not up)."""
        try:
            nodes = self.api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        except OSError:
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def alive(self) -> dict[str, str]:
        """This harness's name -> node id, for every node of it alive now."""
        names = {}
        for node in self.alive_nodes():
            mine = [k for k in node.get("resources_total", {}) if k.startswith(f"{self.tag}_")]
            if mine:
                names[mine[0].removeprefix(f"{self.tag}_")] = node["node_id"]
        return names

    def wait_alive(self, names: set[str], timeout: float = 120) -> dict[str, str]:
        """Wait until exactly ``names`` are alive; returns name -> node id."""
        deadline = time.monotonic() + timeout
        while set(alive := self.alive()) != names:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes alive: {sorted(alive)}, expected {sorted(names)}")
            time.sleep(1)
        return alive

    def actor_nodes(self, class_name: str) -> list[str]:
        """Node ids of every actor of ``class_name`` this cluster has run (dead ones included)."""
        query = (
            "/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D"
            f"&filter_values={class_name}"
        )
        return [a["node_id"] for a in self.api(query)["data"]["result"]["result"]]

    # ------------------------------------------------------------ jobs and Ray Train runs

    def job_status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    def job_logs(self, job_id: str) -> str:
        """The job's log so far ("" when the dashboard does not give it)."""
        try:
            return self.api(f"/api/jobs/{job_id}/logs")["logs"]
        except OSError:
            return ""

    def wait_job(self, job_id: str, timeout: float) -> str:
        """The job's final status, or "<status> after <timeout> s"."""
        deadline = time.monotonic() + timeout
        while (status := self.job_status(job_id)) not in JOB_ENDED:
            if time.monotonic() > deadline:
                return f"{status} after {timeout:.0f} s"
            time.sleep(2)
        return status

    def worker_groups(self) -> list[dict]:
        """Ray Train's worker groups that started (its run attempts, with each worker's
        ``world_rank``, ``pid`` and ``node_id``), oldest first. Needs the job's driver to run
        with ``RAY_TRAIN_ENABLE_STATE_TRACKING=1``."""
        try:
            runs = self.api("/api/train/v2/runs/v1")["train_runs"]
        except OSError:  # no run registered yet
            return []
        started = (a for r in runs for a in r["attempts"] if a["workers"])
        return sorted(started, key=lambda a: a["start_time_ns"])

    def train_rank0(self) -> tuple[str, int] | None:
        """(node name, pid) of rank 0 in Ray Train's running worker group, if one runs on a node
        of this harness that is alive."""
        running = [g for g in self.worker_groups() if g["status"] == "RUNNING"]
        names = {node_id: name for name, node_id in self.alive().items()}
        for w in running[-1]["workers"] if running else []:
            if w["world_rank"] == 0 and w["node_id"] in names:
                return names[w["node_id"]], w["pid"]
        return None
