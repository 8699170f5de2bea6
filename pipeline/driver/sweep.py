"""``python -m pipeline sweep``: several configs x several seeds as Ray Tune trials, resumable.

    python -m pipeline sweep --configs configs/cifar10/plain20.yaml configs/cifar10/resnet20.yaml \\
        --seeds 3 data.root=data/cifar10 tracking.group=degradation-cifar10
    python -m pipeline sweep --configs ... --seeds 3 --list [key=value ...]     # the run folders, one a line

Each (config, seed) is one trial, named ``<config name>-seed<k>``: that is its ``name`` (so its
run folder ``<checkpoint.storage_path>/<name>/`` and its W&B run), and it runs with ``seed=k``.
All trials share the configs' W&B group. A trial is the training loop's ``train_worker`` in a Tune
trial process, reused by the next trial (``under_ray=False``: one process, one GPU or the CPUs Tune gave it), so Tune only
schedules: as many trials at once as the cluster's resources allow (``--max-concurrent`` caps
it). Without GPUs a trial asks for every CPU of this machine by default, so on a laptop the
trials run one after another, each with the whole machine (``--cpus-per-trial`` to share).

Resuming: a trial whose run folder holds ``summary.json`` is finished and is not started again;
any other trial starts, and the training loop resumes a run of the same name and storage path from
its newest checkpoint, so re-running the same command after an interruption finishes only
what is missing. A failed trial is retried ``cluster.max_failures`` times, from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from pipeline.config import Config, ConfigError, load_config, to_dict
from pipeline.store.locations import join
from pipeline.store.rundir import RunDir, run_location

# What a finished trial reports to Tune (from the summary ``train_worker`` returns), for Tune's own table.
REPORTED = ("val_top1_err", "test_top1_err", "epochs", "steps", "wall_s")


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """One (config, seed) of a sweep: its resolved config and where it writes."""

    cfg: Config
    seed: int

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def location(self) -> str:
        return run_location(self.cfg.checkpoint.storage_path, self.cfg.name)

    def finished(self) -> bool:
        return RunDir(self.location).read_summary() is not None


def trial_name(config_name: str, seed: int) -> str:
    """The run name of ``config_name`` trained with ``seed``."""
    return f"{config_name}-seed{seed}"


def plan(configs: list[str], seeds: list[int], overrides: list[str]) -> list[TrialSpec]:
    """Every (config, seed) trial, configs resolved and checked; ``ConfigError`` names the problem.

    Args:
        configs: YAML files, one per network.
        seeds: the seeds each config runs with.
        overrides: dotted overrides for every trial (before the seed and name are set); ``{seed}``
            in one is replaced by the trial's seed (``model.init_from=runs/start-seed{seed}``).
    """
    from pipeline.driver.ray_runner import with_absolute_paths

    if not configs or not seeds:
        raise ConfigError("a sweep needs at least one config and one seed")
    specs = []
    for path in configs:
        for seed in seeds:
            # "{seed}" in an override is the trial's seed: a per-seed model.init_from, for one.
            per_seed = [o.replace("{seed}", str(seed)) for o in overrides]
            base = load_config(path, [*per_seed, f"seed={seed}"])
            cfg = dataclasses.replace(
                base,
                name=trial_name(base.name, seed),
                # A trial is one process; its world is itself whatever the config's cluster says.
                cluster=dataclasses.replace(base.cluster, num_workers=1),
            )
            specs.append(TrialSpec(with_absolute_paths(cfg), seed))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"trials would share run folders ({', '.join(repeated)}): each config needs its own `name` "
            "(do not override name= for a sweep)"
        )
    groups = {s.cfg.tracking.group for s in specs}
    if len(groups) != 1 or None in groups:
        raise ConfigError(
            f"the trials' W&B groups differ or are unset ({sorted(map(str, groups))}); "
            "set one with tracking.group=NAME so one chart holds them all"
        )
    return specs


def trial_resources(cfg: Config, use_gpu: bool, cpus: float | None) -> dict[str, float]:
    """What one trial asks Ray for: a GPU and ``cluster.cpus_per_worker`` CPUs, or CPUs only.

    Args:
        cfg: a trial's config (its ``cluster`` section).
        use_gpu: whether trials train on GPUs.
        cpus: ``--cpus-per-trial``; None: ``cluster.cpus_per_worker`` with a GPU, else every CPU
            of this machine (one trial at a time on a laptop, as without seeds).
    """
    from pipeline.host import usable_cpus

    if use_gpu:
        return {"CPU": cpus or cfg.cluster.cpus_per_worker, "GPU": cfg.cluster.gpus_per_worker}
    return {"CPU": cpus or float(usable_cpus())}


def run_trial(params: dict[str, Any], configs: dict[str, dict[str, Any]]) -> None:
    """A Tune trial: the training loop in this process, with as many torch threads as CPUs Tune gave it.

    Args:
        params: Tune's config for the trial, ``{"trial": <run name>}``.
        configs: every trial's resolved config by run name (passed once through the object store).
    """
    import ray
    import torch
    from ray import tune

    from pipeline.driver.ray_runner import quiet_worker_logs
    from pipeline.train.loop import train_worker

    quiet_worker_logs()
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    summary = train_worker(configs[params["trial"]], under_ray=False)
    tune.report({k: summary[k] for k in REPORTED if summary.get(k) is not None})


def run_sweep(
    specs: list[TrialSpec], *, cpus_per_trial: float | None = None, max_concurrent: int = 0
) -> list[str]:
    """Run the unfinished trials on Ray Tune; returns the names of those still unfinished after it.

    Args:
        specs: from ``plan``.
        cpus_per_trial: see ``trial_resources``.
        max_concurrent: at most this many trials at once (0: as many as resources allow).
    """
    pending = [s for s in specs if not s.finished()]
    for spec in specs:
        if spec not in pending:
            print(f"finished already: {spec.name} ({spec.location}/summary.json)", flush=True)
    if not pending:
        return []
    from pipeline.driver.cluster_check import decide_gpu
    from pipeline.driver.cluster_state import inspect_cluster
    from pipeline.driver.ray_runner import connect, quiet_ray_env

    quiet_ray_env()
    from ray import tune

    first = pending[0].cfg
    address = connect(first)
    # The same GPU decision as training's (cluster.use_gpu: auto/true/false against what the
    # cluster has and can add); a ConfigError says why before any trial starts.
    use_gpu, _, _ = decide_gpu(first.cluster, inspect_cluster(address))
    resources = trial_resources(first, use_gpu, cpus_per_trial)
    group = first.tracking.group
    print(
        f"sweep: {len(pending)} of {len(specs)} trials to run ({', '.join(s.name for s in pending)}); "
        f"each {resources}; W&B group {group}",
        flush=True,
    )
    from ray.tune.logger import JsonLoggerCallback

    trainable = tune.with_parameters(run_trial, configs={s.name: to_dict(s.cfg) for s in pending})
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        # Tune's table shows the run name only; the configs travel beside it (with_parameters).
        param_space={"trial": tune.grid_search([s.name for s in pending])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or None,
            # Every trial asks for the same resources, so the next trial runs in the process the
            # last one ended in: no new process, no second import of torch and DALI per trial. The
            # training loop holds no state between runs (its run, W&B run and RNG seeds are its own).
            reuse_actors=True,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.config["trial"],
        ),
        run_config=tune.RunConfig(
            # Tune's own bookkeeping (one folder per invocation); the runs' files stay in their run folders.
            name=f"{group}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=join(first.checkpoint.storage_path, "_tune"),
            failure_config=tune.FailureConfig(max_failures=first.cluster.max_failures),
            # result.json per trial (quiet_ray_env turns Tune's automatic loggers off).
            callbacks=[JsonLoggerCallback()],
            verbose=1,
        ),
    )
    tuner.fit()
    # Failed beyond max_failures, or never finished (Ctrl-C stops Tune, which then returns normally).
    return [s.name for s in pending if not s.finished()]


def parse_trial_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The options every Ray Tune sweep shares (this command's and `pipeline construction`'s), parsed
    and checked: CPUs per trial, trials at once, --list, the dotted overrides."""
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: see the module doc)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once at most (0: no cap)")
    parser.add_argument("--list", action="store_true", help="print each trial's run folder and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every trial")
    args = parser.parse_args(argv)
    if (
        args.seeds < 1
        or args.max_concurrent < 0
        or (args.cpus_per_trial is not None and args.cpus_per_trial <= 0)
    ):
        parser.error("--seeds must be >= 1, --max-concurrent >= 0 and --cpus-per-trial > 0")
    return args


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, metavar="FILE", help="one YAML per network")
    parser.add_argument(
        "--seeds", type=int, required=True, help="seeds per config: first-seed .. first-seed+N-1"
    )
    parser.add_argument("--first-seed", type=int, default=0)
    args = parse_trial_args(parser, argv)

    from pipeline.data.layout import DataLayoutError
    from pipeline.train.checkpoint import CheckpointError

    try:
        specs = plan(args.configs, list(range(args.first_seed, args.first_seed + args.seeds)), args.overrides)
        if args.list:
            print("\n".join(s.location for s in specs))
            return 0
        from pipeline.driver.train_cmd import preflight

        for path_index in range(len(args.configs)):  # each network once: data, model, derived values
            preflight(specs[path_index * args.seeds].cfg)
    except (ConfigError, DataLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a run that would resume mid-epoch over other data (preflight)
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        unfinished = run_sweep(specs, cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent)
    except ConfigError as e:  # the cluster cannot run it (e.g. cluster.use_gpu=true and no GPU)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if unfinished:
        print(
            f"error: {len(unfinished)} run(s) did not finish (failed or interrupted): {', '.join(unfinished)}; "
            "their checkpoints are kept: run the same command again to finish only these",
            file=sys.stderr,
        )
        return 1
    print(f"sweep complete: {len(specs)} runs", flush=True)
    for spec in specs:
        print(f"  {spec.location}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
