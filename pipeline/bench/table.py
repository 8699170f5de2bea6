"""Markdown tables of ``bench`` results, one section per JSON file.

python -m pipeline bench table bench-results/*.json --out bench-results/bench.md
"""

from __future__ import annotations

from typing import Any


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ratio(r: float | None, paired: float | None) -> str:
    return "-" if r is None else f"{r:.3f} ({_num(paired, 3)})"


def _machine(r: dict[str, Any]) -> str:
    m = r["machine"]
    load = ", ".join(f"{x:.2f}" for x in m.get("load_avg_start", []))
    load_end = ", ".join(f"{x:.2f}" for x in m.get("load_avg_end", []))
    return (
        f"Machine: {m['cpu_model']}, nproc {m['nproc']}; load average (1, 5, 15 min) {load} at the start, "
        f"{load_end} at the end.\nCommand: `{r.get('command', '?')}`\n"
    )


def _loader(r: dict[str, Any]) -> str:
    rows = [
        "| pipeline | DALI img/s | torchvision img/s | DALI / torchvision |",
        "| --- | ---: | ---: | ---: |",
    ]
    parts = (
        (
            f"train: shorter side {r['scale'][0]}-{r['scale'][1]}, random {r['crop_size']} crop, flip",
            r["train"],
        ),
        (f"val: 10-crop at {r['crop_size']} from shorter side {r['val_resize']}", r["val_tencrop"]),
    )
    for name, part in parts:
        if part:
            rows.append(
                f"| {name} | {_num(part['dali_img_per_s'])} | {_num(part['torchvision_img_per_s'])} "
                f"| {_num(part['ratio'], 2)} |"
            )
    title = (
        f"### Data loader: DALI vs torchvision DataLoader ({r['threads']} DALI threads = {r['threads']} "
        f"worker processes, batch {r['batch_size']}, CPU decode)"
    )
    extra = []
    if b := r.get("epoch_boundary"):
        extra.append(
            f"Epoch boundary, last batch to the first of the next epoch: {b['continuous_s'] * 1e3:.1f} ms with the "
            f"pipeline running on (built once), {b['rebuilt_s'] * 1e3:.1f} ms with a pipeline built anew for the epoch."
        )
    if m := r.get("mmap"):
        extra.append(
            f"DALI train pass reading the files by mmap: {_num(m['mmap_img_per_s'])} img/s; by plain reads "
            f"(`data.mmap: false`, the default): {_num(m['read_img_per_s'])} img/s."
        )
    return "\n".join([title, "", *rows, "", *extra, "", _machine(r)])


def _model(r: dict[str, Any]) -> str:
    rows = [
        "| variant | train img/s | torchvision train img/s | ratio (paired) "
        "| 10-crop eval img/s | torchvision eval img/s | ratio (paired) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in r["variants"]:
        if v.get("error"):
            rows.append(f"| {v['variant']} | error: {v['error']} | | | | | |")
            continue
        rows.append(
            f"| {v['variant']} | {_num(v['train_img_per_s'])} | {_num(v['torchvision_train_img_per_s'])} "
            f"| {_ratio(v['ratio'], v.get('ratio_paired'))} | {_num(v.get('eval_img_per_s'))} "
            f"| {_num(v.get('torchvision_eval_img_per_s'))} | {_ratio(v.get('eval_ratio'), v.get('eval_ratio_paired'))} |"
        )
    title = (
        f"### Model step: {r['model']} vs {r['reference'] or 'no reference'} ({r['device']}: {r['device_name']}, "
        f"batch {r['batch_size']}, input {r['input_size']}, {r['threads']} threads, median of {r['steps']} steps)"
    )
    return "\n".join([title, "", *rows, "", _machine(r)])


def _ray(r: dict[str, Any]) -> str:
    rows = [
        "| measure | value |",
        "| --- | ---: |",
        f"| time to the first step, plain Python process | {r['plain_first_step_s']:.1f} s |",
        f"| time to the first step, TorchTrainer 1 worker (from `import ray`) | {r['ray_first_step_s']:.1f} s |",
        f"| start-up overhead of Ray Train | {r['startup_overhead_s']:.1f} s |",
        f"| of which `ray.init` | {r['ray_init_s']:.1f} s |",
        f"| img/s: plain process / 1 worker / 2 workers | {r['plain_img_per_s']:.1f} / "
        f"{r['img_per_s_1_worker']:.1f} / {r['img_per_s_2_workers']:.1f} |",
        f"| scaling efficiency 1 -> 2 workers (gloo) | {r['scaling_efficiency']:.2f} |",
    ]
    for run in r.get("fixed_global_batch_runs", []):
        micro = f", micro-batches of {run['max_worker_batch']}" if run["max_worker_batch"] else ""
        rows.append(
            f"| img/s, global batch {r['fixed_global_batch']} over {run['workers']} worker(s){micro} "
            f"| {run['img_per_s']:.1f} |"
        )
    title = (
        f"### Ray Train on CPU: {r['model']} at {r['input_size']}px, batch {r['batch_size']} per worker, "
        "1 CPU and 1 torch thread per worker"
    )
    return "\n".join([title, "", *rows, "", _machine(r)])


def _engine(r: dict[str, Any]) -> str:
    rows = ["| code | img/s |", "| --- | ---: |", f"| this checkout | {r['img_per_s']:.1f} |"]
    if r.get("baseline"):
        rows.append(f"| `{r['baseline']}` | {r['baseline_img_per_s']:.1f} |")
        rows.append(f"| ratio | {r['ratio']:.3f} |")
    title = f"### Training loop on CPU: `train --no-ray`, demo recipe, batch {r['batch_size']}, {r['epochs']} epochs"
    return "\n".join([title, "", *rows, "", _machine(r)])


SECTIONS = {"loader": _loader, "model": _model, "ray": _ray, "engine": _engine}


def markdown(results: list[dict[str, Any]]) -> str:
    """One Markdown section per result, in the given order.

    Args:
        results: parsed JSON results of ``bench loader``, ``bench model`` and ``bench ray``.
    """
    sections = []
    for r in results:
        kind = r.get("bench") if isinstance(r, dict) else None
        if kind not in SECTIONS:
            raise ValueError(
                f"not a bench result: 'bench' is {kind!r}, expected one of {', '.join(SECTIONS)}"
            )
        sections.append(SECTIONS[kind](r))
    return "\n".join(sections)
