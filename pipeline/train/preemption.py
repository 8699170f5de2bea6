"""A checkpoint when a node of the worker group is about to be reclaimed (a spot instance).

A reclaim reaches Ray as a node drain with a deadline (autoscaler v2 and KubeRay drain a node
before they terminate it); Ray Train's preemption watcher marks every worker of the group, and
``ray.train.get_preemption_info()`` hands rank 0's mark to every rank. That call is a barrier
over the workers, so it is made every ``every`` steps, a count all ranks agree on from their
measured step time (``cluster.preemption_poll_s`` apart), never at every step. A SIGTERM to a
worker (a pod deleted with a grace period) is a notice too: each rank's flag is summed over the
process group at the same steps.

On a notice every rank takes a mid-epoch checkpoint at that step (the state that
``checkpoint.every_n_steps`` writes), uploaded before training goes on; rank 0 says how long it
took against the deadline. With a deadline, training goes on, and at the last poll after which
another upload would not fit before it, a last checkpoint is taken and the workers wait for
the reclaim (until the deadline and ``RECLAIM_GRACE_S`` more; then, still alive, they train
on): no step trained after that checkpoint is lost with the node. Ray Train then restarts the
group (a drain is not counted against ``cluster.max_failures`` but against
``cluster.max_preemption_failures``) and the run resumes from that checkpoint. Polls happen
between training steps only: not at an epoch's last step (its end-of-epoch checkpoint
follows) nor during evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.train.distributed import DistContext, all_reduce_sum

# Steps timed before the poll interval is set: the first step of a group (compilation, the
# loader's first batch) is left out, then this many are averaged.
CALIBRATION_STEPS = 5

# How long past a notice's deadline the workers wait for the reclaim before they train on.
RECLAIM_GRACE_S = 30.0

# Set by the SIGTERM handler below: signals reach a process, not a run, so the flag is the
# process's; Ray runs one training worker per process.
_SIGTERM_SEEN = threading.Event()


def note_sigterm() -> None:
    """Make a SIGTERM a preemption notice for the next poll instead of ending the worker. Run on
    each worker's main thread (Ray runs a worker's tasks there; only it may set handlers): a
    second SIGTERM goes to the handler before, Ray's, which ends the worker."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if _SIGTERM_SEEN.is_set():  # the second: as if this handler had never been set
            signal.signal(signal.SIGTERM, previous)
            os.kill(os.getpid(), signal.SIGTERM)
        _SIGTERM_SEEN.set()

    signal.signal(signal.SIGTERM, handler)


@dataclasses.dataclass(frozen=True)
class Notice:
    """What a poll found: the nodes to be reclaimed (their ranks) and the deadline, if any."""

    ranks_by_node: dict[str, list[int]]
    deadline: float | None  # UNIX seconds
    sigterm: bool

    def key(self) -> tuple:
        return (tuple(sorted(self.ranks_by_node)), self.deadline, self.sigterm)

    def describe(self) -> str:
        nodes = ", ".join(f"node {n[:8]} (ranks {r})" for n, r in sorted(self.ranks_by_node.items()))
        drained = f"{nodes} drained" if nodes else ""
        return " and ".join(x for x in (drained, "a worker got SIGTERM" if self.sigterm else "") if x)


@dataclasses.dataclass(frozen=True)
class Due:
    """A checkpoint to take now: at a new notice (``last`` False), or the last one that can
    still be uploaded before the notice's deadline (``last`` True)."""

    notice: Notice
    last: bool


class PreemptionPoll:
    """When to ask whether the group is being preempted, and when to checkpoint for it: at a
    notice at once; with a deadline once more, at the last poll after which the next would leave
    less than twice the first's upload time (then ``wait_for_reclaim``)."""

    def __init__(self, poll_s: float, ctx: DistContext, ask: Callable[[], Any]):
        self.poll_s, self.ctx, self.ask = poll_s, ctx, ask  # ask: ray.train.get_preemption_info
        self.steps = 0  # steps of this worker group
        self.every: int | None = None  # steps between polls, once calibrated
        self.next_poll = 0
        self.timer = 0.0
        self.seen: set[tuple] = set()
        self.pending: Notice | None = None  # a notice whose last checkpoint is still to come
        self.upload_s = 0.0  # how long the notice's checkpoint took
        self.last_poll = 0.0
        self.polls, self.poll_seconds = 0, 0.0

    @classmethod
    def for_run(cls, run: Any) -> PreemptionPoll | None:
        """Under Ray with ``cluster.preemption_poll_s`` > 0; else None (no Ray Train to ask)."""
        poll_s = run.cfg.cluster.preemption_poll_s
        if not run.ctx.under_ray or poll_s <= 0:
            return None
        import ray.train

        return cls(poll_s, run.ctx, ray.train.get_preemption_info)

    def after_step(self, last_in_epoch: bool) -> Due | None:
        """Called by every rank after each training step; the same answer on every rank."""
        self.steps += 1
        if self.every is None:
            self._calibrate()
            return None
        if self.steps < self.next_poll or last_in_epoch:
            return None  # a poll skipped at an epoch's last step comes at the next step
        self.next_poll = self.steps + self.every
        notice, last_now = self._poll()
        if notice is not None and notice.key() not in self.seen:
            self.seen.add(notice.key())
            self.pending = notice if notice.deadline is not None else None
            return Due(notice, last=False)
        if last_now and self.pending is not None:
            due, self.pending = Due(self.pending, last=True), None
            return due
        return None

    def uploaded(self, due: Due, seconds: float) -> None:
        """The checkpoint of ``due`` took ``seconds`` (written, reported and uploaded)."""
        if not due.last:
            self.upload_s = seconds

    def wait_for_reclaim(self, due: Due) -> str | None:
        """After the last checkpoint before ``due``'s deadline: sleep until the deadline and
        ``RECLAIM_GRACE_S`` more (a process that lives on was not reclaimed); a line to print."""
        if not due.last or due.notice.deadline is None:
            return None
        time.sleep(max(0.0, due.notice.deadline + RECLAIM_GRACE_S - time.time()))
        return f"preemption: no reclaim {RECLAIM_GRACE_S:g} s past the deadline; training goes on"

    def interval(self) -> str:
        if self.every is None:
            return f"not yet set (after {CALIBRATION_STEPS + 1} steps)"
        cost = f", {1000 * self.poll_seconds / self.polls:.1f} ms a poll" if self.polls else ""
        return f"every {self.every} steps (about {self.poll_s:g} s){cost}"

    def _calibrate(self) -> None:
        """The slowest rank's mean step time over ``CALIBRATION_STEPS`` sets the interval (one
        all-reduce, at the same step on every rank: all ranks take the same steps)."""
        if self.steps == 1:
            self.timer = time.perf_counter()
        elif self.steps == 1 + CALIBRATION_STEPS:
            mean = (time.perf_counter() - self.timer) / CALIBRATION_STEPS
            self.every = poll_every(self.poll_s, slowest(mean, self.ctx))
            self.next_poll = self.steps + self.every
            self.last_poll = time.perf_counter()

    def _poll(self) -> tuple[Notice | None, bool]:
        """(the notice Ray Train has for the group, or a SIGTERM's; whether the pending notice's
        last checkpoint is due). Rank 0 alone decides the latter (clocks differ); the flags of
        every rank are summed in one all-reduce, so every rank gets the same answer."""
        start = time.perf_counter()
        gap, self.last_poll = start - self.last_poll, start
        info = self.ask()  # a barrier: every rank calls it at this step
        last_now = (
            self.ctx.is_main
            and self.pending is not None
            and last_chance(self.pending.deadline, gap, self.upload_s)
        )
        flags = torch.tensor([float(_SIGTERM_SEEN.is_set()), float(last_now)], device=self.ctx.device)
        sigterm, last_now = (v > 0 for v in all_reduce_sum(flags).tolist())
        self.polls, self.poll_seconds = self.polls + 1, self.poll_seconds + time.perf_counter() - start
        if info is None and not sigterm:
            return None, last_now
        nodes = dict(info.preempted_node_to_ranks) if info else {}
        deadline = info.deadline_ms / 1000 if info and info.deadline_ms else None
        return Notice(nodes, deadline, sigterm), last_now


def last_chance(deadline: float | None, gap_s: float, upload_s: float, now: float | None = None) -> bool:
    """Whether the poll after this one (``gap_s`` later) would leave less than twice the upload
    time (and a second) before ``deadline``: then the last checkpoint is taken now, if one
    upload still fits."""
    if deadline is None:
        return False
    left = deadline - (time.time() if now is None else now)
    return upload_s < left < gap_s + 2 * upload_s + 1.0  # with less than one upload left: too late


def poll_every(poll_s: float, step_s: float) -> int:
    """Steps between polls: ``poll_s`` seconds of steps, at least one."""
    return max(1, math.ceil(poll_s / max(step_s, 1e-9)))


def slowest(value: float, ctx: DistContext) -> float:
    """The largest ``value`` over the ranks."""
    if ctx.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def checkpoint_line(due: Due, step: int, took: float, poll: PreemptionPoll) -> str:
    """Rank 0's line once the checkpoint of ``due`` is uploaded: how long it took, against the deadline."""
    when = "no deadline given"
    if due.notice.deadline is not None:
        left = due.notice.deadline - time.time()
        when = (
            f"{left:.1f} s before the deadline" if left >= 0 else f"WARNING: {-left:.1f} s after the deadline"
        )
    what = (
        "last checkpoint before the deadline"
        if due.last
        else f"preemption notice: {due.notice.describe()}; checkpoint"
    )
    then = "; waiting for the reclaim" if due.last else ""
    return f"{what} at step {step} uploaded in {took:.1f} s, {when} (polls {poll.interval()}){then}"
