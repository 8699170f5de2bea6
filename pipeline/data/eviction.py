"""Which cached shards to delete to make room: Belady's choice within a job, the oldest across jobs.

    victims = choose_victims(cached, pinned, live, mine, next_use, need)
    # None: not enough can go; else the names to delete, in that order

Cached shards are named by their content (``shards/<sha256>.tar``), so one file may belong to
several datasets: ``mine`` is the set this job's manifest names, ``live`` the set that the datasets
of every live process name (this job's included). A file named by neither is a leftover.

A pure function of what the ledger (``pipeline.data.cache_ledger``) and the read plan
(``pipeline.data.next_use``) say, so a test can state each case. The order of preference:

1. shards that no live process's dataset names (a job that finished, or a copy in a folder of
   the layout before shards were named by content), oldest first;
2. this job's shards, the one read furthest in the future first (Belady's optimal policy);
3. shards only another live job names, oldest first (their next reads are known only to it).

Pinned shards (held open, read in some process's current window, or being fetched) never go.
A prefetch (``before`` set: the next read of the shard it would fetch) takes only from 1 and from
this job's shards read after ``before``: fetching early must not push out a shard needed sooner.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def choose_victims(
    cached: dict[str, tuple[int, int]],
    pinned: set[str],
    live: set[str],
    mine: set[str],
    next_use: Callable[[list[str]], np.ndarray],
    need: int,
    before: int | None = None,
) -> list[str] | None:
    """The fewest shards, in order of preference, whose bytes add up to at least ``need``.

    Args:
        cached: ``"<folder>/<file>"`` -> (bytes, mtime_ns) of every cached shard (``on_disk``).
        pinned: names no one may delete.
        live: the names that the datasets of live processes name.
        mine: the names this job's dataset names.
        next_use: this job's next read of each of its shards (positions; ``next_use.NEVER``: none).
        need: bytes to free.
        before: for a prefetch, the next read of the shard to fetch; None for a read that waits.
    """
    free = [n for n in cached if n not in pinned]
    leftovers = sorted((n for n in free if n not in live and n not in mine), key=lambda n: cached[n][1])
    own = [n for n in free if n in mine]
    uses = next_use(own) if own else np.empty(0, np.int64)
    ranked = [own[k] for k in np.argsort(-uses, kind="stable") if before is None or uses[k] > before]
    others = []
    if before is None:
        others = sorted((n for n in free if n in live and n not in mine), key=lambda n: cached[n][1])
    chosen, freed = [], 0
    for name in leftovers + ranked + others:
        if freed >= need:
            break
        chosen.append(name)
        freed += cached[name][0]
    return chosen if freed >= need else None
