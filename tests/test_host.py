"""``pipeline.host``: process pools fork only a process that runs one thread.

A pool forked from a process with other threads (the test session's Ray driver, a DALI
pipeline, pyarrow's S3 client) can inherit a lock held by a thread that does not exist in the
child, and wait on it forever: the README-commands fixture's ``data synth`` hung the suite that
way until CI's time limit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline.host import os_threads, pool_context

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, threading, time
from pipeline.host import pool_context
if sys.argv[1] == "thread":
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
print(pool_context().get_start_method())
"""


def _method(kind: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, kind], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_single_threaded_process_forks_and_a_threaded_one_spawns():
    assert _method("none") == "fork"
    assert _method("thread") == "spawn"


def test_os_threads_counts_threads_python_does_not_see():
    import threading

    before = os_threads()
    done = threading.Event()
    worker = threading.Thread(target=done.wait)
    worker.start()
    try:
        assert os_threads() == before + 1 >= threading.active_count()
        assert pool_context().get_start_method() == "spawn"
    finally:
        done.set()
        worker.join()


def test_every_process_pool_asks_pool_context():
    """No module picks fork itself (spawn, always safe, a module may ask for by name)."""
    offenders = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "host.py":
            continue
        for line in path.read_text().splitlines():
            if (
                re.search(r"multiprocessing\.get_context\(|set_start_method\(|\bPool\(", line)
                and "pool_context()" not in line
                and 'get_context("spawn")' not in line
            ):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert offenders == [], offenders
