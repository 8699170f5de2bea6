"""Elastic runs shrink quickly after a node loss: ``cluster.restart_timeout_s`` and
``pipeline.driver.elastic``, without a cluster.

The key is checked at load; ``BoundedRestart`` lowers the start timeout once a worker group has
run; ``ElasticFailurePolicy`` does not charge a start that timed out asking for more than
``min`` workers to ``cluster.start_retries``; ``run_on_ray`` wires both only into elastic runs.
Both rely on Ray 2.60 internals: the pins below fail when an upgrade changes them (read
``pipeline/driver/elastic.py``'s docstring, then re-check each against Ray's source). The real
node loss is ``make drill`` (cluster/README.md).
"""

from __future__ import annotations

import inspect
import os
import pickle
from typing import Any

import pytest
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.callback_manager import CallbackManager
from ray.train.v2._internal.execution.controller.state import (
    InitializingState,
    ReschedulingState,
    RestartingState,
    RunningState,
    SchedulingState,
)
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from pipeline.config import ConfigError, load_config
from pipeline.driver.elastic import BoundedRestart, ElasticFailurePolicy, elastic_trainer

# ------------------------------------------------------------------ the key


def test_restart_timeout_default_and_bad_values_name_the_key():
    cluster = load_config(None, ["cluster.num_workers=[2, 3]"]).cluster
    assert (cluster.restart_timeout_s, cluster.start_timeout_s) == (60.0, 900.0)
    assert load_config(None, ["cluster.restart_timeout_s=30"]).cluster.restart_timeout_s == 30
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=r"cluster\.restart_timeout_s: must be positive, got"):
            load_config(None, [f"cluster.restart_timeout_s={bad}"])
    with pytest.raises(ConfigError, match=r"cluster\.restart_timeout_s: expected"):
        load_config(None, ["cluster.restart_timeout_s=soon"])


def test_restart_timeout_above_start_timeout_is_an_error_for_elastic_runs_only():
    elastic = ["cluster.num_workers=[2, 3]", "cluster.start_timeout_s=15"]
    with pytest.raises(
        ConfigError, match=r"cluster\.restart_timeout_s: 60 is more than cluster\.start_timeout_s \(15\)"
    ):
        load_config(None, elastic)
    assert load_config(None, [*elastic, "cluster.restart_timeout_s=15"]).cluster.restart_timeout_s == 15
    # A fixed-size run never reads the key: a short start_timeout_s alone stays valid.
    assert (
        load_config(None, ["cluster.num_workers=2", "cluster.start_timeout_s=2"]).cluster.start_timeout_s == 2
    )


# ------------------------------------------------------------------ BoundedRestart


def test_bounded_restart_lowers_the_timeout_only_once_a_group_has_run(monkeypatch):
    monkeypatch.setenv(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, "900.0")
    callbacks = CallbackManager([BoundedRestart(45)])  # how the controller invokes its callbacks
    decision = ResizeDecision(num_workers=3, resources_per_worker={"CPU": 1})
    failed = ControllerError(WorkerGroupStartupTimeoutError(3))
    # The first start (and a first start that timed out) keeps cluster.start_timeout_s.
    for previous, state in [
        (InitializingState(), SchedulingState(decision)),
        (SchedulingState(decision), ReschedulingState(failed)),
        (ReschedulingState(failed), SchedulingState(decision)),
    ]:
        callbacks.invoke("after_controller_state_update", previous, state)
        assert os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "900.0"
    callbacks.invoke("after_controller_state_update", SchedulingState(decision), RunningState())
    assert os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "45.0"
    # ... and it stays so through the restart after a failure.
    callbacks.invoke("after_controller_state_update", RunningState(), RestartingState(failed))
    assert os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "45.0"


def test_policy_and_callback_pickle_by_reference_for_the_controller_actor():
    policy = ElasticFailurePolicy(FailureConfig(controller_failure_limit=3), min_workers=2)
    for obj in (BoundedRestart(60), policy):
        data = pickle.dumps(obj)
        assert b"pipeline.driver.elastic" in data  # the class by its module, importable in the actor
        assert type(pickle.loads(data)) is type(obj)


# ------------------------------------------------------------------ ElasticFailurePolicy


def timeout(n: int) -> ControllerError:
    return ControllerError(WorkerGroupStartupTimeoutError(n))


def test_ray_default_charges_every_start_timeout_to_the_limit():
    """Why the policy exists: Ray's counter is cumulative for the run."""
    policy = DefaultFailurePolicy(FailureConfig(controller_failure_limit=3))
    assert [policy.make_decision(timeout(3)) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [
        FailureDecision.RAISE
    ]


def node_lost() -> WorkerGroupError:
    return WorkerGroupError("rank 0 died", {0: RuntimeError("node lost")})


def test_oversized_start_timeouts_never_use_up_start_retries():
    """Every node loss: the running group fails, then a start for all the workers times out."""
    policy = ElasticFailurePolicy(FailureConfig(max_failures=-1, controller_failure_limit=1), min_workers=2)
    for _ in range(10):
        assert policy.make_decision(node_lost()) == FailureDecision.RETRY
        assert policy.make_decision(timeout(3)) == FailureDecision.RETRY
    assert policy.uncounted_timeouts == 10
    # At min the cluster really has too little: counted as before (limit 1: one retry).
    assert policy.make_decision(timeout(2)) == FailureDecision.RETRY
    assert policy.make_decision(timeout(2)) == FailureDecision.RAISE


def test_a_size_that_never_places_still_ends_the_run():
    """Oversized timeouts in a row, no group running between them: free up to the limit, then
    counted as Ray counts them (so limit 2: 2 free, 2 counted retries, then the run fails)."""
    policy = ElasticFailurePolicy(FailureConfig(controller_failure_limit=2), min_workers=2)
    decisions = [policy.make_decision(timeout(3)) for _ in range(5)]
    assert decisions == [FailureDecision.RETRY] * 4 + [FailureDecision.RAISE]
    assert policy.uncounted_timeouts == 2
    forever = ElasticFailurePolicy(FailureConfig(controller_failure_limit=-1), min_workers=2)
    assert {forever.make_decision(timeout(3)) for _ in range(20)} == {FailureDecision.RETRY}


def test_other_failures_are_rays_default():
    policy = ElasticFailurePolicy(FailureConfig(max_failures=1, controller_failure_limit=0), min_workers=2)
    worker_error = node_lost()
    assert policy.make_decision(worker_error) == FailureDecision.RETRY
    assert policy.make_decision(worker_error) == FailureDecision.RAISE
    failed_start = ControllerError(WorkerGroupStartupFailedError("actor died"))
    assert policy.make_decision(failed_start) == FailureDecision.RAISE  # limit 0, counted
    assert policy.make_decision(ControllerError(ValueError("bug"))) == FailureDecision.RAISE
    assert policy.uncounted_timeouts == 0


# ------------------------------------------------------------------ the wiring


def test_elastic_trainer_swaps_only_the_failure_policy():
    class Base:
        def __init__(self) -> None:
            self.run_config = RunConfig(failure_config=FailureConfig(controller_failure_limit=2))
            self.scaling_config = ScalingConfig(num_workers=(2, 3))

        def _initialize_and_run_controller(self, **kwargs: Any) -> dict:
            return kwargs

    trainer_cls = elastic_trainer(Base)
    assert elastic_trainer(Base) is trainer_cls and issubclass(trainer_cls, Base)
    got = trainer_cls()._initialize_and_run_controller(
        scaling_policy="rays", failure_policy="rays", callbacks=[]
    )
    assert got["scaling_policy"] == "rays" and got["callbacks"] == []
    policy = got["failure_policy"]
    assert isinstance(policy, ElasticFailurePolicy) and policy.min_workers == 2
    assert policy.failure_config.controller_failure_limit == 2


def test_run_on_ray_wires_it_into_elastic_runs_only(recorded_trainer, tmp_path):
    from pipeline.driver.ray_runner import run_on_ray

    common = ["cluster.use_gpu=false", f"checkpoint.storage_path={tmp_path}", "optim.batch_size=8"]
    cfg = load_config(None, [*common, "cluster.num_workers=[2, 3]", "cluster.restart_timeout_s=30"])
    assert run_on_ray(cfg, worker=lambda loop_config: None) == "fitted"
    (callback,) = [c for c in recorded_trainer["run_config"].callbacks if isinstance(c, BoundedRestart)]
    assert callback.restart_timeout_s == 30
    # The first start still waits cluster.start_timeout_s.
    assert os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "900.0"
    recorded_trainer.clear()
    fixed = [*common, "cluster.num_workers=2", "cluster.preemption_poll_s=0"]
    run_on_ray(load_config(None, fixed), worker=lambda loop_config: None)
    assert recorded_trainer["run_config"].callbacks == []  # nor SIGTERM notes without preemption polls


# ------------------------------------------------------------------ pins on Ray's internals


def test_ray_internals_the_module_relies_on():
    """Fails loudly when a Ray upgrade changes what pipeline.driver.elastic builds on."""
    import ray
    from ray.train.v2._internal.execution.controller.controller import TrainController
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert ray.__version__ == "2.60.0", "re-check pipeline/driver/elastic.py against this Ray's source"
    assert WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    # The timeout is read per worker group (so a change between starts applies to the next).
    assert "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR" in inspect.getsource(WorkerGroup.__init__)
    # RunningState follows a successful start: _start_worker_group, then next_state=RunningState().
    resize = inspect.getsource(TrainController._execute_resize_decision)
    assert resize.index("self._start_worker_group(") < resize.index("next_state=RunningState()")
    # A state update reaches the controller callbacks with (previous, current).
    assert '"after_controller_state_update", previous_state, state' in inspect.getsource(
        TrainController._set_state
    )
    # The policies reach the controller actor as keyword arguments of this private hook.
    assert {"scaling_policy", "failure_policy", "callbacks"} <= set(
        inspect.signature(TrainController).parameters
    )
    assert any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(DataParallelTrainer._initialize_and_run_controller).parameters.values()
    )
    fit = inspect.getsource(DataParallelTrainer.fit)
    assert "self._initialize_and_run_controller(" in fit and "failure_policy=create_failure_policy(" in fit
    # Non-user callbacks in RunConfig.callbacks go into the controller as they are.
    assert "not isinstance(cb, UserCallback)" in inspect.getsource(
        DataParallelTrainer._create_default_callbacks
    )
    # The failure policy's interface and the timeout error's size.
    assert list(inspect.signature(DefaultFailurePolicy.make_decision).parameters) == [
        "self",
        "training_failed_error",
    ]
    assert WorkerGroupStartupTimeoutError(3).num_workers == 3
    error = WorkerGroupStartupTimeoutError(3)
    assert ControllerError(error).controller_failure is error
