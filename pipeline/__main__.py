"""The command line: ``python -m pipeline <command> [args]``.

Each command lives in its own module, which exposes ``main(argv) -> int`` and owns its
argument parsing; this file only dispatches, and imports the module lazily so that
``python -m pipeline models`` does not pay for Ray or DALI.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("pipeline.driver.train_cmd", "train a model from a YAML config (Ray Train)"),
    "eval": ("pipeline.driver.eval_cmd", "evaluate a checkpoint (center / tencrop / multiscale)"),
    "data": (
        "pipeline.data.prep.cli",
        "dataset tools: synth, index, check-layout, verify, prepare-val, stats",
    ),
    "sweep": (
        "pipeline.driver.sweep",
        "configs x seeds as Ray Tune trials (resumable), e.g. the degradation study",
    ),
    "deepen": (
        "pipeline.construction.deepen",
        "a deeper net from a trained shallower one: copied layers + identity blocks (the paper's construction)",
    ),
    "construction": (
        "pipeline.construction.experiment",
        "the constructed solution as an experiment: constructed vs from scratch vs shallower (Ray Tune)",
    ),
    "models": ("pipeline.models.cli", "list registered models with params and multiply-adds"),
    "bench": ("pipeline.bench", "throughput benchmarks (loader, model, ray)"),
    "report": ("pipeline.report.single", "figures and tables against the paper from run directories"),
    "wandb-sync": ("pipeline.tracking.sync", "one W&B history for a run across restarts, then wandb sync"),
    "dashboard": (
        "pipeline.tracking.dashboard",
        "W&B workspaces and reports built in code (training, degradation, ...)",
    ),
}


def usage() -> str:
    lines = ["usage: python -m pipeline <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
