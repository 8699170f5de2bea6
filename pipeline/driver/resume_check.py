"""Before the workers start: a run that would resume mid-epoch over other data is refused here.

    problem = resume_problem(cfg, source)    # None, or the message (both digests, how to switch)

A mid-epoch checkpoint replays its epoch's sample order from the step it stopped at, and the
sharded layout's order depends on the manifest and ``data.shuffle_window``
(``pipeline.train.checkpoint.order_pin_problem``). The workers check this when they restore,
but under Ray that is after the cluster has placed them and each has built its loaders; the
driver knows enough to refuse first. It reads only what the workers would resume from: the
run's newest checkpoint, else ``resume_from``, and only when that one is mid-epoch (its name
says so), so a run resuming at an epoch's end or starting afresh reads nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.shard_feed import ShardedSource
from pipeline.store.rundir import run_location
from pipeline.train.checkpoint import list_checkpoints, order_pin_problem, pick_checkpoint

MID_EPOCH_MARK = "_step"  # checkpoint_epoch0003_step0000450 (``checkpoint_name``)


def resume_problem(cfg: Config, source: Any) -> str | None:
    """Why this run cannot resume where its checkpoints say over ``source`` (the opened dataset),
    or None."""
    location = run_location(cfg.checkpoint.storage_path, cfg.name)
    try:
        candidates = list_checkpoints(location) or ([cfg.resume_from] if cfg.resume_from else [])
    except (OSError, ValueError):
        return None  # storage that cannot be listed: the cluster checks (or the workers) say why
    if not candidates or MID_EPOCH_MARK not in Path(candidates[0].rstrip("/")).name:
        return None
    chosen, state, _, _ = pick_checkpoint(candidates)
    if chosen is None:
        return None  # none readable: the workers say so, or fall back
    pin = source.order_pin(cfg.data) if isinstance(source, ShardedSource) else None  # as Data.order_pin
    return order_pin_problem(state, pin, chosen, location, cfg.data.root)
