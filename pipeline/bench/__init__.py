"""``python -m pipeline bench <loader|model|ray|engine|feed|fetch|table>``: throughput benchmarks with JSON results.

    python -m pipeline bench loader --data data/synth-bench --json      # DALI vs torchvision DataLoader
    python -m pipeline bench model --model resnet50_v1_5 --json          # step img/s vs torchvision
    python -m pipeline bench ray --json                                  # Ray Train start-up, 1->2 workers
    python -m pipeline bench engine --data data/synth-bench --baseline REV  # the training loop vs a commit
    python -m pipeline bench feed --data data/synth-feed --latency-ms 30  # local vs S3 per image vs shards
    python -m pipeline bench fetch --objects 8 --object-mb 128            # peak memory of fetching shards
    python -m pipeline bench table bench-results/*.json                  # Markdown table of results
    make bench                                                           # all three into bench-results/

Every result records the machine (nproc, CPU model, load average at start and end) and the
exact command. ``--json`` prints the result as JSON, ``--out FILE`` writes it to a file (what
``make bench`` uses: Ray may print worker lines on stdout), and without either a short text
summary is printed.

Each benchmark lives in its own module and imports what it measures only when it runs:
``bench model`` never imports Ray or DALI, so it runs on a machine with torch alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pipeline.bench.common import BenchError

BENCHES = {
    "loader": "pipeline.bench.loader",
    "model": "pipeline.bench.model",
    "ray": "pipeline.bench.ray_train",
    "engine": "pipeline.bench.engine",
    "feed": "pipeline.bench.feed",
    "fetch": "pipeline.bench.fetch_memory",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench",
        description="Throughput benchmarks (loader, model, ray, engine, feed, fetch) with JSON results, and a Markdown table of them.",
    )
    sub = parser.add_subparsers(
        dest="bench", required=True, metavar="{loader,model,ray,engine,feed,fetch,table}"
    )
    for name, module_name in BENCHES.items():
        # The modules import only torch and the standard library at the top; what they measure
        # (DALI, torchvision, Ray) is imported inside run().
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    t = sub.add_parser("table", help="a Markdown table of bench JSON files")
    t.add_argument("files", nargs="+", type=Path, help="results written with --out / --json")
    t.add_argument("--out", type=Path, default=None, help="write the Markdown here instead of stdout")
    return parser


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write a result as indented JSON, creating the folder.

    Args:
        result: a benchmark's result.
        path: the destination file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str]) -> int:
    """Run one ``bench`` subcommand; 0 on success, 2 on a request that cannot run.

    Args:
        argv: the arguments after ``bench``.
    """
    args = _parser().parse_args(argv)
    if args.bench == "table":
        from pipeline.bench.table import markdown

        try:
            text = markdown([json.loads(f.read_text()) for f in args.files])
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        else:
            print(text, end="")
        return 0
    module = importlib.import_module(BENCHES[args.bench])
    try:
        result = module.run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = shlex.join(["python", "-m", "pipeline", "bench", *argv])
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result, indent=2) if args.json else module.format_text(result), flush=True)
    return 0
