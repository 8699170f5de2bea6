"""Ray nodes on this one machine (the drill, the cluster tests): free ports, and ending what was started.

Every process the drill or a test starts carries a marker entry in its environment
(``NAME=value``); teardown kills only the processes that carry it, never anything else running
here (no ``ray stop``).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


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


def kill_marked(entry: str, timeout: float = 10) -> None:
    """SIGKILL every process carrying ``entry`` until none is left (or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while (left := pids_with_env(entry)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
