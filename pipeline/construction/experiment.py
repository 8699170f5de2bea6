"""``python -m pipeline construction`` (``make construction``): the constructed solution as an experiment.

    python -m pipeline construction --seeds 3 data.root=data/cifar10
    python -m pipeline construction --seeds 3 --list data.root=data/cifar10    # the run folders, one a line

For each pair (plain-20 -> plain-56 and ResNet-20 -> ResNet-56 by default, ``--pairs``) and each
seed, as Ray Tune trials (``pipeline sweep``'s, one Ray session for the whole command):

1. the shallower net is trained (``construction-plain20-seed<k>``);
2. the deeper net is built from its final checkpoint (``pipeline deepen``: copied layers,
   identity blocks, logits checked) into ``<storage>/construction-plain56-start-seed<k>/``;
3. three runs on the same budget (the config's schedule) and seed: the deeper net from the
   construction (``construction-plain56-constructed-seed<k>``, ``model.init_from`` = the start
   folder), the deeper net from scratch (``...-plain56-scratch-seed<k>``) and the shallower one
   continued from its final checkpoint (``...-plain20-continued-seed<k>``). Each starts its
   schedule at step 0, so the three curves share their x-axis.

Every run is in the W&B group ``construction-cifar10`` with a tag naming its role
(``construction-shallow``, ``-constructed``, ``-scratch``, ``-continued``). Re-running the same
command finishes only what is missing: finished runs (``summary.json``) are skipped, interrupted
ones resume from their checkpoints, a start folder that holds a ``state.pt`` is kept. Then
``python -m pipeline report --kind construction`` draws the figures, the table and the verdict.
The start folders are written locally, so ``checkpoint.storage_path`` must be a local path here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.driver.sweep import TrialSpec, parse_trial_args, plan, run_sweep, trial_name

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = "configs/cifar10"
GROUP = "construction-cifar10"
DEFAULT_PAIRS = ("plain20:plain56", "resnet20:resnet56")
ROLES = ("shallow", "constructed", "scratch", "continued")


@dataclass(frozen=True)
class Pair:
    """A shallower and a deeper config (file stems under configs/cifar10/)."""

    shallow: str
    deep: str

    def config(self, net: str) -> str:
        path = Path(CONFIG_DIR) / f"{net}.yaml"
        return str(path if path.is_file() else ROOT / path)

    def run_name(self, role: str) -> str:
        """The run name (before ``-seed<k>``) of one role."""
        net = self.shallow if role in ("shallow", "continued") else self.deep
        return f"construction-{net}" + ("" if role == "shallow" else f"-{role}")

    def start_name(self, seed: int | str) -> str:
        """The folder name of the deeper net built from the shallower one's seed-``seed`` run."""
        return f"construction-{self.deep}-start-seed{seed}"


def parse_pairs(values: list[str]) -> list[Pair]:
    pairs = []
    for value in values:
        shallow, sep, deep = value.partition(":")
        if not sep or not shallow or not deep:
            raise ConfigError(f"--pairs {value!r}: give SHALLOW:DEEP config names, e.g. plain20:plain56")
        pairs.append(Pair(shallow, deep))
    return pairs


def _specs(pair: Pair, role: str, seeds: list[int], overrides: list[str], store: str) -> list[TrialSpec]:
    net = pair.shallow if role in ("shallow", "continued") else pair.deep
    extra = [f"tracking.tags=[cifar10,construction,construction-{role}]"]
    if role == "constructed":
        extra.append(f"model.init_from={store}/{pair.start_name('{seed}')}")  # {seed}: filled in per trial
    elif role == "continued":  # the shallower run's folder: its newest (final) checkpoint
        extra.append(f"model.init_from={store}/{trial_name(pair.run_name('shallow'), '{seed}')}")
    # The group first (an override may rename it), the name last (each role needs its own).
    return plan(
        [pair.config(net)],
        seeds,
        [f"tracking.group={GROUP}", *overrides, *extra, f"name={pair.run_name(role)}"],
    )


def storage_of(overrides: list[str], pair: Pair) -> str:
    """The resolved local storage path; ``ConfigError`` for a URI (the start folders are local)."""
    from pipeline.config import load_config
    from pipeline.store.locations import is_uri

    storage = load_config(pair.config(pair.shallow), overrides).checkpoint.storage_path
    if is_uri(storage):
        raise ConfigError(
            f"checkpoint.storage_path={storage!r}: `pipeline construction` writes its start checkpoints "
            "locally; give a local (or mounted) folder"
        )
    return str(Path(storage).expanduser().resolve())


def build_starts(pairs: list[Pair], seeds: list[int], overrides: list[str], store: str) -> int:
    """Stage 2: each deeper net from its shallower run's final checkpoint (kept if already there)."""
    from pipeline.construction import deepen

    for pair in pairs:
        for seed in seeds:
            out = Path(store) / pair.start_name(seed)
            if (out / "state.pt").is_file():
                print(f"built already: {out}", flush=True)
                continue
            shallow_run = Path(store) / trial_name(pair.run_name("shallow"), seed)
            rc = deepen.main(
                ["--checkpoint", str(shallow_run), "--config", pair.config(pair.deep), "--out", str(out),
                 *[o.replace("{seed}", str(seed)) for o in overrides], f"seed={seed}"]
            )  # fmt: skip
            if rc != 0:
                return rc
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline construction", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per run: first-seed .. first-seed+N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--pairs", nargs="+", default=list(DEFAULT_PAIRS), metavar="SHALLOW:DEEP",
        help=f"config names under {CONFIG_DIR}/ (default: {' '.join(DEFAULT_PAIRS)})",
    )  # fmt: skip
    args = parse_trial_args(parser, argv)  # --cpus-per-trial, --max-concurrent, --list, overrides
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    from pipeline.data.layout import DataLayoutError
    from pipeline.train.checkpoint import CheckpointError

    try:
        pairs = parse_pairs(args.pairs)
        store = storage_of(args.overrides, pairs[0])
        stages = {
            role: [s for pair in pairs for s in _specs(pair, role, seeds, args.overrides, store)]
            for role in ROLES
        }
        if args.list:
            print("\n".join(s.location for role in ROLES for s in stages[role]))
            return 0
        from pipeline.driver.train_cmd import preflight

        for spec in stages["shallow"][:: len(seeds)] + stages["scratch"][:: len(seeds)]:
            preflight(spec.cfg)  # data, model, derived values: each network once, before any training
    except (ConfigError, DataLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a run that would resume mid-epoch over other data (preflight)
        print(f"error: {e}", file=sys.stderr)
        return 1
    sweep = {"cpus_per_trial": args.cpus_per_trial, "max_concurrent": args.max_concurrent}
    print(f"construction: stage 1 of 3, the shallower nets ({len(stages['shallow'])} runs)", flush=True)
    unfinished = run_sweep(stages["shallow"], **sweep)
    if not unfinished:
        print("construction: stage 2 of 3, the deeper nets built from them", flush=True)
        rc = build_starts(pairs, seeds, args.overrides, store)
        if rc != 0:
            return rc
        follow = stages["constructed"] + stages["scratch"] + stages["continued"]
        print(
            f"construction: stage 3 of 3, constructed / from scratch / continued ({len(follow)} runs)",
            flush=True,
        )
        unfinished = run_sweep(follow, **sweep)
    if unfinished:
        print(
            f"error: {len(unfinished)} run(s) did not finish (failed or interrupted): {', '.join(unfinished)}; "
            "their checkpoints are kept: run the same command again to finish only what is missing",
            file=sys.stderr,
        )
        return 1
    print(f"construction complete: {sum(len(v) for v in stages.values())} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
