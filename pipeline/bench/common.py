"""What every benchmark records beside its numbers: the machine, its load, robust statistics.

Imports only the standard library, so ``bench model`` stays free of Ray and DALI.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

from pipeline.host import usable_cpus


class BenchError(ValueError):
    """A benchmark request that cannot run as given; the message says why and what to do."""


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages, rounded; empty where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on; the load is sampled now (callers sample again at the end).

    ``nproc`` is what ``nproc`` prints (the usable CPUs); ``cpu_count`` the host's logical CPUs.
    """
    return {
        "nproc": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_avg_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def finish_machine(machine: dict[str, Any]) -> dict[str, Any]:
    """``machine`` with the load average at the end of the run added."""
    return {**machine, "load_avg_end": load_average()}


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence; a load spike on a shared machine moves it less than the mean."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either side was not measured."""
    if a is None or b is None or b <= 0:
        return None
    return a / b
