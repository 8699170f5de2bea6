"""Checkpoint on a preemption notice (pipeline/train/preemption.py): when the workers ask Ray
Train, what they agree on, when they checkpoint; a SIGTERM as a notice; the config keys. The run
under Ray with a SIGTERMed worker is in tests/test_train_checkpoint.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.train import preemption
from pipeline.train.preemption import CALIBRATION_STEPS, Due, PreemptionPoll, last_chance, poll_every

ROOT = Path(__file__).resolve().parents[1]
CTX = SimpleNamespace(world_size=1, is_main=True, device=torch.device("cpu"))


def info(deadline_s: float | None, nodes: dict | None = None) -> SimpleNamespace:
    """What ray.train.get_preemption_info() returns: deadline in UNIX ms, node -> ranks."""
    deadline_ms = None if deadline_s is None else int(deadline_s * 1000)
    return SimpleNamespace(deadline_ms=deadline_ms, preempted_node_to_ranks=nodes or {"ab" * 28: [0]})


def test_poll_interval_is_poll_s_of_steps():
    assert poll_every(5.0, 0.25) == 20
    assert poll_every(5.0, 0.3) == 17  # rounded up: never more often than poll_s
    assert poll_every(5.0, 60.0) == 1  # a step longer than poll_s: every step
    assert poll_every(0.5, 0.0) > 10**6  # no measurable step time: (almost) never


def test_polls_every_interval_after_calibration_and_not_at_an_epochs_last_step(monkeypatch):
    asked = []
    poll = PreemptionPoll(1.0, CTX, ask=lambda: asked.append(poll.steps))
    monkeypatch.setattr(preemption.time, "perf_counter", lambda: 0.25 * poll.steps)  # 0.25 s a step
    for _ in range(1 + CALIBRATION_STEPS):
        assert poll.after_step(last_in_epoch=False) is None
    assert poll.every == 4 and asked == []  # 1 s of 0.25 s steps; calibrating asks nothing
    for step in range(2 + CALIBRATION_STEPS, 20):
        poll.after_step(last_in_epoch=step == 14)  # due at 14: skipped, asked at 15 instead
    assert asked == [10, 15, 19]


def test_a_notice_checkpoints_once_then_once_more_before_its_deadline(monkeypatch):
    """A notice: a checkpoint at once; the same notice at later polls: none, until the next
    poll would come too late for another upload; a new notice: a checkpoint again."""
    answers = iter(
        [None, info(1000.0), info(1000.0), info(1000.0), info(1000.0), info(2000.0, {"cd" * 28: [1]})]
    )
    poll = PreemptionPoll(1.0, CTX, ask=lambda: next(answers))
    poll.every = 1  # calibrated: a poll at every step
    now = iter([980.0, 985.0, 991.0])  # UNIX time at the polls after the notice's
    monkeypatch.setattr(preemption.time, "time", lambda: next(now))
    assert poll.after_step(False) is None
    first = poll.after_step(False)
    assert first == Due(first.notice, last=False) and first.notice.deadline == 1000.0
    poll.uploaded(first, 2.0)
    polls = iter([0.0, 0.1, 5.0, 5.1, 10.0, 10.1, 15.0, 15.1])  # each poll's start and end: 5 s apart
    monkeypatch.setattr(preemption.time, "perf_counter", lambda: next(polls))
    poll.last_poll = -5.0
    assert poll.after_step(False) is None  # 20 s left, 15 s after the next poll: > 2 x 2 s upload + 1
    assert poll.after_step(False) is None  # 15 s left, 10 s after the next
    last = poll.after_step(False)  # 9 s left, 4 s after the next: < 5, so the last one now
    assert last is not None and last.last and last.notice == first.notice
    new = poll.after_step(False)
    assert new is not None and not new.last and new.notice.ranks_by_node == {"cd" * 28: [1]}


def test_after_the_last_checkpoint_the_workers_wait_for_the_reclaim(monkeypatch):
    slept = []
    monkeypatch.setattr(preemption.time, "sleep", slept.append)
    monkeypatch.setattr(preemption.time, "time", lambda: 100.0)
    poll = PreemptionPoll(1.0, CTX, ask=lambda: None)
    notice = preemption.Notice({"ab" * 28: [0]}, deadline=110.0, sigterm=False)
    assert poll.wait_for_reclaim(Due(notice, last=False)) is None and slept == []  # trains on
    line = poll.wait_for_reclaim(Due(notice, last=True))
    assert slept == [10.0 + preemption.RECLAIM_GRACE_S] and "no reclaim" in line  # still alive after
    no_deadline = preemption.Notice({}, deadline=None, sigterm=True)
    assert poll.wait_for_reclaim(Due(no_deadline, last=True)) is None


def test_last_chance_leaves_room_for_two_uploads_and_skips_what_cannot_finish():
    assert not last_chance(None, 5.0, 1.0, now=0.0)  # no deadline (a SIGTERM): no last one
    assert not last_chance(100.0, 5.0, 1.0, now=80.0)  # 20 s left, 15 after the next poll
    assert last_chance(100.0, 5.0, 1.0, now=93.0)  # 7 s left, 2 after the next: < 2 x 1 + 1
    assert not last_chance(100.0, 5.0, 3.0, now=98.0)  # 2 s left: an upload of 3 s cannot finish


def test_a_sigterm_is_noted_once_and_a_second_ends_the_process():
    code = (
        "import os, signal, time\n"
        "from pipeline.train import preemption\n"
        "preemption.note_sigterm()\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "print('noted', preemption._SIGTERM_SEEN.is_set(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "print('still here')\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "noted True\n" and proc.returncode == -15, (
        proc.returncode,
        proc.stdout,
        proc.stderr,
    )
    assert time.monotonic() - started < 30


def test_config_keys_are_checked():
    cfg = load_config("configs/demo.yaml", [])
    assert cfg.cluster.preemption_poll_s == 5.0 and cfg.cluster.max_preemption_failures == -1
    with pytest.raises(ConfigError, match="cluster.preemption_poll_s: must be 0"):
        load_config("configs/demo.yaml", ["cluster.preemption_poll_s=-1"])
    with pytest.raises(ConfigError, match="cluster.max_preemption_failures: must be -1"):
        load_config("configs/demo.yaml", ["cluster.max_preemption_failures=-2"])


def test_the_ray_runner_passes_the_keys_and_notes_sigterm(recorded_trainer, tmp_path):
    from pipeline.driver.ray_runner import run_on_ray

    common = ["cluster.use_gpu=false", f"checkpoint.storage_path={tmp_path}", "optim.batch_size=8"]
    run_on_ray(load_config(None, [*common, "cluster.max_preemption_failures=4"]), worker=lambda c: None)
    run_config = recorded_trainer["run_config"]
    assert run_config.failure_config.max_preemption_failures == 4
    assert [type(c).__name__ for c in run_config.callbacks] == ["SigtermNotes"]  # its workers note SIGTERM
