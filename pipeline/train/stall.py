"""A data stall that names itself: rank 0 says once per run when the step waited for its batch
more than ``STALL_PCT`` of an epoch, with the likely cause from what was measured and the setting
to change.

    note = StallNote.for_run(run)            # pipeline.train.setup.Run
    note.check(epoch, train_metrics)         # after every epoch: prints at most once per run

The cause is read from what the run holds, not guessed from speed alone: the sharded layout's
cache counts its GETs (a cache still filling from object storage), the decode device
(``data.decoder``) and the loader threads each worker has (``data.num_threads``, derived from
``cluster.cpus_per_worker`` when 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import is_cifar

if TYPE_CHECKING:
    from pipeline.train.setup import Run

STALL_PCT = 10.0  # of an epoch's training time spent waiting for batches


def fetch_counts(loader: Any) -> dict[str, float] | None:
    """The shard cache's fetch counters behind a training loader of the sharded layout, else None."""
    stats = getattr(getattr(loader, "cache", None), "fetch_stats", None)
    return stats.snapshot() if stats is not None else None


def likely_cause(run: Run, threads: int, fetched: dict[str, float] | None) -> str:
    """What most likely starved the step, and the setting to change.

    Args:
        run: the worker's run (its config and device).
        threads: the loader threads this worker was given.
        fetched: the shard cache's GETs, retries and 503s during the epoch (sharded layout), or None.
    """
    data = run.cfg.data
    if fetched and fetched["gets"] > 0:
        return (
            f"the node's shard cache was still fetching from object storage ({fetched['gets']:.0f} GETs this "
            f"epoch, {fetched['retries']:.0f} retried, {fetched['throttled']:.0f} refused with 503 SlowDown); "
            f"once the cache holds every shard no GETs are made. To fetch faster raise data.cache_fetchers "
            f"(now {data.cache_fetchers}), or fill data.cache_dir before training"
        )
    if is_cifar(data.dataset):
        return (
            "the CIFAR-10 loader augments each batch on the host; a worker with more CPUs "
            f"(cluster.cpus_per_worker, now {run.cfg.cluster.cpus_per_worker:g}) keeps up better"
        )
    if run.ctx.device.type == "cuda" and data.decoder == "cpu":
        return (
            f"DALI decodes the JPEGs on the CPU (data.decoder=cpu) with {threads} thread(s); "
            "data.decoder=auto decodes them on the GPU"
        )
    where = (
        "on the CPU" if run.ctx.device.type != "cuda" else "on the GPU, with the reads and resizes on the CPU"
    )
    setting = (
        f"data.num_threads={data.num_threads}"
        if data.num_threads > 0
        else f"data.num_threads=0, derived from cluster.cpus_per_worker={run.cfg.cluster.cpus_per_worker:g}"
    )
    return (
        f"DALI decodes {where} with {threads} thread(s) per worker ({setting}); raise data.num_threads "
        "or cluster.cpus_per_worker, and data.prefetch (now "
        f"{data.prefetch}) to absorb uneven batches"
    )


@dataclass
class StallNote:
    """Rank 0's once-per-run note on a data stall; inert on other ranks."""

    run: Run
    threads: int
    is_main: bool
    said: bool = False
    _fetched: dict[str, float] | None = None  # the cache's counters at the previous check

    @classmethod
    def for_run(cls, run: Run) -> StallNote:
        from pipeline.train.setup import worker_threads

        note = cls(run, worker_threads(run.cfg, run.ctx), run.ctx.is_main)
        note._fetched = fetch_counts(run.data.train)
        return note

    def check(self, epoch: int, metrics: dict[str, float]) -> str | None:
        """Print (and return) the note when ``metrics['perf/data_stall_pct']`` of ``epoch`` exceeds
        ``STALL_PCT`` for the first time in the run; None otherwise."""
        now = fetch_counts(self.run.data.train)
        during = None
        if now is not None:
            before = self._fetched or {}
            during = {k: v - before.get(k, 0) for k, v in now.items()}
        self._fetched = now
        stall = metrics.get("perf/data_stall_pct")
        if self.said or not self.is_main or stall is None or stall <= STALL_PCT:
            return None
        self.said = True
        message = (
            f"warning: data stall: in epoch {epoch + 1} the step waited for its batch {stall:.1f} % of the "
            f"training time (over {STALL_PCT:g} %; perf/data_stall_pct). Likely cause: "
            f"{likely_cause(self.run, self.threads, during)}. (Said once per run.)"
        )
        print(message, flush=True)
        return message
