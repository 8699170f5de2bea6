"""What this process may use of its machine. Standard library only, so any command can ask."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's count: containers, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1
