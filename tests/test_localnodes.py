"""cluster/localnodes.py: the nodes' environment, teardown by marker, and nodes that stop when their starter dies.

.venv/bin/python -m pytest -q tests/test_localnodes.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from localnodes import MARKER, VENV_BIN, LocalNodes, free_ports, kill_all, pids_with_env


def _on_path(env: dict[str, str]) -> bool:
    return any(p and Path(p).resolve() == VENV_BIN.resolve() for p in env["PATH"].split(os.pathsep))


def test_nodes_run_without_the_venv_on_path_unless_asked(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join([str(VENV_BIN), "/usr/bin", "/bin"]))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # another cluster's: never inherited
    plain, with_venv = LocalNodes("lnt"), LocalNodes("lnt", venv_on_path=True, env={"X_EXTRA": "1"})
    try:
        assert not _on_path(plain.node_env) and "/usr/bin" in plain.node_env["PATH"].split(os.pathsep)
        assert _on_path(with_venv.node_env) and with_venv.node_env["X_EXTRA"] == "1"
        assert (
            _on_path(plain.client_env) and "X_EXTRA" not in with_venv.client_env
        )  # clients: as a user's shell
        for env in (plain.node_env, plain.client_env):
            assert "RAY_ADDRESS" not in env and env["RAY_AUTH_MODE"] == "token"
            assert Path(env["RAY_AUTH_TOKEN_PATH"]).read_text() == plain.token
        assert plain.node_env["RAY_API_SERVER_ADDRESS"] == plain.address
        assert plain.resource("head") == "lnt_head"
    finally:
        plain.stop()
        with_venv.stop()
    assert not plain.root.exists() and not with_venv.root.exists()


def test_stop_ends_what_carries_the_marker_and_nothing_else():
    nodes = LocalNodes("lnt")
    ours = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"], env=nodes.client_env)
    other = subprocess.Popen(["sleep", "300"], env={**os.environ, MARKER: "/tmp/someone-else"})
    try:
        assert ours.pid in nodes.leftover_pids() and other.pid not in nodes.leftover_pids()
        nodes.stop()
        assert ours.wait(timeout=10) != 0 and nodes.leftover_pids() == []
        assert other.poll() is None  # another cluster's process lives on
    finally:
        other.kill()
        other.wait()
        ours.kill()


def test_free_ports_are_distinct():
    ports = free_ports(32)
    assert len(set(ports)) == 32 and all(0 < p < 65536 for p in ports)


def test_counted_s3_server_counts_the_gets_of_tar_objects(monkeypatch):
    """``start_s3(counted=True)`` (the drill's ``--layout sharded``) serves moto behind
    pipeline.bench.s3_latency; ``s3_counts`` reads its counters; ``stop`` ends it."""
    import pyarrow.fs

    nodes = LocalNodes("lnt")
    try:
        for key, value in nodes.start_s3("lnt-bucket", counted=True).items():
            monkeypatch.setenv(key, value)
        fs, _ = pyarrow.fs.FileSystem.from_uri("s3://lnt-bucket")
        with fs.open_output_stream("lnt-bucket/train-000000.tar") as f:
            f.write(b"x" * 1000)
        for _ in range(2):
            with fs.open_input_file("lnt-bucket/train-000000.tar") as f:
                assert f.read() == b"x" * 1000
        counts = nodes.s3_counts()
        assert counts["GET.tar"] == 2 and counts["GET"] == 2 and counts["PUT"] >= 1, counts
    finally:
        nodes.stop()
    assert nodes.s3 is not None and nodes.s3.poll() is not None


@pytest.mark.ray
def test_a_killed_starter_leaves_no_node_or_s3_server_running(tmp_path):
    """A drill or test ended by SIGKILL (a timeout, CI's end) runs no ``finally``: its Ray node and
    S3 server still stop, since each is told to when the process that started it dies."""
    script = tmp_path / "starter.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'cluster')!r})\n"
        "from localnodes import LocalNodes\n"
        "nodes = LocalNodes('lnk')\n"
        "nodes.start_s3('killed')\n"
        "nodes.start('head', head=True)\n"
        "print(nodes.root, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    root = proc.stdout.strip().splitlines()[-1]  # printed once the server and the node were up
    deadline = time.monotonic() + 60
    while pids_with_env(f"{MARKER}={root}") and time.monotonic() < deadline:
        time.sleep(0.5)
    left = pids_with_env(f"{MARKER}={root}")
    kill_all(left)  # never leave them to the next test
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"still running after their starter was killed: {left}"
