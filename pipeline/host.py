"""What this process may use of its machine. Standard library only, so any command can ask."""

from __future__ import annotations

import multiprocessing
import os
import threading
from multiprocessing.context import BaseContext


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's count: containers, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def os_threads() -> int:
    """Threads of this process, native ones included (Ray's, DALI's, pyarrow's: Python sees none of those)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc (macOS)
        return threading.active_count()


def pool_context() -> BaseContext:
    """The start method for a process pool: fork where it is safe, spawn otherwise.

    A forked child gets only the forking thread; a lock another thread held at that moment
    (malloc's, a logger's, Ray's or DALI's own) stays held in the child forever, and the pool
    waits on it forever. So fork only a process that has one thread (a plain CLI command);
    anything that already runs threads (a Ray driver, a test session, a DALI pipeline) spawns.
    """
    if "fork" in multiprocessing.get_all_start_methods() and os_threads() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True
