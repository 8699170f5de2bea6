"""Real-sized synthetic JPEGs for the GPU check: about 500x375 and 110 KB, like ImageNet's.

    info = write_real_sized("data/gpu-check", classes=10, train_per_class=32, val_per_class=4)

The pictures are ``pipeline.data.prep.synth``'s (a class shape over clutter and noise, so a network
can learn them), drawn at the sizes ImageNet's median photo has (500x375 landscape, 375x500
portrait, 500x333) and saved at a quality that gives ImageNet's typical file size, so a
decoder meets the work it meets in training. The folder is ImageNet-layout, written to a
hidden sibling and renamed into place with its ``.complete`` marker, and reused when it already
holds the same set.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.host import pool_context, usable_cpus

SIZES = ((500, 375), (375, 500), (500, 333))  # (width, height), in this proportion 4:2:1 below
SIZE_WEIGHTS = (4, 2, 1)
QUALITY = 96  # measured: about 100-110 KB for these pictures at 500x375
MARKER = ".complete"
PARAMS = ".gpu-check-images.json"
VERSION = 1


def _size(rng: np.random.Generator) -> tuple[int, int]:
    weights = np.asarray(SIZE_WEIGHTS, np.float64)
    return SIZES[int(rng.choice(len(SIZES), p=weights / weights.sum()))]


def _write_one(task: tuple[str, int, int, int, int]) -> tuple[int, int, int]:
    from pipeline.data.prep.synth import render_image

    path, seed, split, c, i = task
    rng = np.random.default_rng([seed, split, c, i, 0x6C])
    width, height = _size(rng)
    buf = io.BytesIO()
    render_image(c, (width, height), rng).save(buf, format="JPEG", quality=QUALITY)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue()), width, height


def write_real_sized(
    out: str | os.PathLike[str],
    *,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write (or reuse) the ImageNet-layout set and return its statistics.

    Args:
        out: the dataset folder (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``).
        classes, train_per_class, val_per_class: how many images.
        seed: the images are a pure function of the arguments.
        workers: rendering processes (default: every CPU this process may use).

    Returns:
        ``{"root", "train", "val", "mean_bytes", "min_bytes", "max_bytes", "sizes", "reused"}``.
    """
    if min(classes, train_per_class, val_per_class) <= 0:
        raise ValueError(
            f"classes ({classes}), train_per_class ({train_per_class}) and val_per_class ({val_per_class}) "
            "must all be positive"
        )
    root = Path(out).expanduser().absolute()
    params = {
        "classes": classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "version": VERSION,
    }
    if (root / MARKER).is_file() and (root / PARAMS).is_file():
        saved = json.loads((root / PARAMS).read_text())
        if saved.get("params") == params:
            return {**saved["stats"], "root": str(root), "reused": True}
    if root.exists() and any(root.iterdir()) and not (root / PARAMS).is_file():
        raise FileExistsError(
            f"{root}: not empty and not written by the GPU check; choose another --data folder"
        )
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tasks = []
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c in range(classes):
            folder = tmp / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            tasks += [
                (str(folder / f"{split}_{c:03d}_{i:05d}.JPEG"), seed, split_id, c, i)
                for i in range(per_class)
            ]
    try:
        n = max(1, min(workers or usable_cpus(), len(tasks)))
        if n > 1:
            with pool_context().Pool(n) as pool:
                written = pool.map(_write_one, tasks, chunksize=max(1, len(tasks) // (n * 4)))
        else:
            written = [_write_one(t) for t in tasks]
        sizes = np.asarray([w[0] for w in written], np.float64)
        shapes: dict[str, int] = {}
        for _, w, h in written:
            shapes[f"{w}x{h}"] = shapes.get(f"{w}x{h}", 0) + 1
        stats = {
            "train": classes * train_per_class,
            "val": classes * val_per_class,
            "classes": classes,
            "mean_bytes": float(sizes.mean()),
            "min_bytes": int(sizes.min()),
            "max_bytes": int(sizes.max()),
            "sizes": shapes,
        }
        (tmp / PARAMS).write_text(json.dumps({"params": params, "stats": stats}, sort_keys=True) + "\n")
        (tmp / MARKER).write_text("")
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**stats, "root": str(root), "reused": False}
