"""``python -m pipeline models [--json] [--blurpool]``: every registered model, its parameters and
multiply-adds.

    python -m pipeline models             # aligned table
    python -m pipeline models --json      # [{"name", "params", "macs", "input_size"}, ...]
    python -m pipeline models --blurpool  # the ImageNet networks as model.blurpool=true builds them

Multiply-adds are counted by PyTorch's FlopCounterMode at the model's native input (224 for
ImageNet nets, 32 for CIFAR-10 nets) and halved (one multiply-add = two FLOPs), which is
how the paper's Table 1 "FLOPs" are meant.
"""

from __future__ import annotations

import argparse
import json

from pipeline.models.registry import MODEL_NAMES, model_spec, summarize


def format_table(rows: list[dict[str, int | str]]) -> str:
    """Aligned text table of ``summarize`` rows."""
    header = ("model", "input", "params", "params (M)", "mult-adds", "mult-adds (G)")
    lines = [
        (
            str(r["name"]),
            f"{r['input_size']}x{r['input_size']}",
            f"{r['params']:,}",
            f"{int(r['params']) / 1e6:.2f}",
            f"{r['macs']:,}",
            f"{int(r['macs']) / 1e9:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        # Names read left-aligned, numbers right-aligned so their digits line up.
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, lines)])


def main(argv: list[str]) -> int:
    """Run the ``models`` command.

    Args:
        argv: the arguments after ``models``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipeline models",
        description="List registered models with parameter counts and multiply-adds at their native input.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    parser.add_argument(
        "--blurpool",
        action="store_true",
        help="the ImageNet networks with model.blurpool: the blur's multiply-adds counted (no parameters)",
    )
    args = parser.parse_args(argv)
    names = [n for n in MODEL_NAMES if not args.blurpool or model_spec(n).family == "imagenet"]
    rows = [summarize(name, blurpool=args.blurpool) for name in names]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
