"""Elastic runs shrink quickly after a node loss (``cluster.restart_timeout_s``).

Ray Train 2.60's ``ElasticScalingPolicy`` decides a restart's size from its
``AutoscalingCoordinator``, whose view of the nodes lags a loss: the GCS still lists the dead
node for a few seconds, and the coordinator refreshes its node list only every 20 s. So right
after a node loss Ray Train asks again for all the workers it had. That placement group cannot
be placed, and the start waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (our
``cluster.start_timeout_s``, 900 s, sized for GPU nodes booting) before Ray Train decides again
and starts with the workers that fit. Two pieces fix that, used only for elastic runs
(``ray_runner.run_on_ray``):

- :class:`BoundedRestart`, a controller callback: once a worker group has run, it sets the
  start timeout to ``cluster.restart_timeout_s`` in the controller's process. Ray Train reads
  the variable in every ``WorkerGroup.__init__`` (``worker_group.py``), so the first start keeps
  ``cluster.start_timeout_s`` and every later one (a restart after a failure, an elastic resize)
  waits ``restart_timeout_s``, then Ray Train decides the size again from the nodes alive.
- :class:`ElasticFailurePolicy`, the controller's failure policy: a start that timed out asking
  for more than ``min`` workers (a size guess from a stale view) is retried without counting
  against ``cluster.start_retries``, which Ray counts over the whole run; otherwise the 4th
  node loss of a long run would end it. Timeouts at ``min`` workers count as before, and so do
  oversized ones beyond ``start_retries`` in a row with no worker-group failure between them.

Both run inside Ray Train's controller actor (they are pickled into it), so they live here at
module level, importable wherever ``pipeline`` is (the job's working dir, the venv).

PRIVATE RAY API (ray 2.60.0, pinned in pyproject.toml): the callback base class
(``ray.train.v2._internal.execution.callback.ControllerCallback``, a DeveloperAPI), the
controller states, the start-timeout variable's name, ``WorkerGroupStartupTimeoutError`` and
``DefaultFailurePolicy`` are internal, and the failure policy is swapped in through
``DataParallelTrainer._initialize_and_run_controller``'s keyword arguments.
tests/test_driver_elastic.py checks each of these against the installed Ray and fails loudly
when an upgrade changes them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import RunningState
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.config import FailureConfig
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError

logger = logging.getLogger(__name__)


class BoundedRestart(ControllerCallback):
    """Every worker-group start after the first running one waits at most ``restart_timeout_s``."""

    def __init__(self, restart_timeout_s: float):
        self.restart_timeout_s = float(restart_timeout_s)

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        # RunningState is entered only once WorkerGroup.create has returned (the group placed
        # and started), and again after every healthy poll: setting it again is harmless.
        if isinstance(current_state, RunningState):
            os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(self.restart_timeout_s)


class ElasticFailurePolicy(DefaultFailurePolicy):
    """Ray's default policy, except that a start timed out for more than ``min_workers`` is
    retried (Ray Train then decides the size again) without counting as a failed start.

    Only a streak of such timeouts with no worker-group failure in between (one for every node
    loss: the running group fails first) is free, up to ``controller_failure_limit`` of them;
    beyond that they count as Ray counts them, so a size that Ray Train keeps choosing and that
    never places (resources held outside Ray Train) still ends the run."""

    def __init__(self, failure_config: FailureConfig, min_workers: int):
        super().__init__(failure_config)
        self.min_workers = int(min_workers)
        self.uncounted_timeouts = 0  # over the run, for the log
        self.streak = 0  # oversized timeouts since the last worker-group failure

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if not isinstance(training_failed_error, ControllerError):
            self.streak = 0  # a group ran and failed (a node lost, a preemption)
        elif oversized_start_timeout(training_failed_error, self.min_workers):
            limit = self.failure_config.controller_failure_limit
            if limit == -1 or self.streak < limit:
                self.streak += 1
                self.uncounted_timeouts += 1
                logger.warning(
                    "A worker group of %d did not fit in time (an elastic run needs %d): deciding "
                    "the size again, not counted against cluster.start_retries (%d in a row, %d in the run)",
                    training_failed_error.controller_failure.num_workers,
                    self.min_workers,
                    self.streak,
                    self.uncounted_timeouts,
                )
                return FailureDecision.RETRY
        return super().make_decision(training_failed_error)


def oversized_start_timeout(error: BaseException, min_workers: int) -> bool:
    """Whether ``error`` is a start that timed out waiting for more than ``min_workers``."""
    inner = getattr(error, "controller_failure", None) if isinstance(error, ControllerError) else None
    return isinstance(inner, WorkerGroupStartupTimeoutError) and inner.num_workers > min_workers


_TRAINERS: dict[type, type] = {}


def elastic_trainer(base: type) -> type:
    """``base`` (Ray's ``TorchTrainer``) with :class:`ElasticFailurePolicy` as the controller's
    failure policy. Only the policy goes into the controller actor; this class stays on the
    driver, so it may be made here from whatever ``base`` is."""
    if base not in _TRAINERS:

        def _initialize_and_run_controller(self: Any, **controller_init_kwargs: Any) -> Any:
            controller_init_kwargs["failure_policy"] = ElasticFailurePolicy(
                self.run_config.failure_config, self.scaling_config.min_workers
            )
            return base._initialize_and_run_controller(self, **controller_init_kwargs)

        _TRAINERS[base] = type(
            f"Elastic{base.__name__}",
            (base,),
            {"_initialize_and_run_controller": _initialize_and_run_controller},
        )
    return _TRAINERS[base]
