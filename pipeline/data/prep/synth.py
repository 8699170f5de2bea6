"""Synthetic, learnable datasets in the real on-disk formats, for demos and tests.

    python -m pipeline data synth --out data/synth --classes 10 --train-per-class 100 --val-per-class 20
    python -m pipeline data synth-cifar --out data/synth-cifar --train-per-class 500 --test-per-class 100

ImageNet layout: ``OUT/train/n00000003/n00000003_000017.JPEG`` and ``OUT/val/<class>/...``, real
JPEGs of varied sizes (shorter side 200-500 px, aspect 3:4 to 16:9, both orientations). Each
class is a shape with its own colour and texture, drawn at a random position, scale and
rotation over a random background with distractor shapes and pixel noise, so a small ResNet
has something to learn at 64-112 px but cannot read the class off a single pixel.

Output is a pure function of the arguments (same seed, same bytes) and appears atomically:
the files are written to a hidden sibling folder that is renamed into place only once the
``.complete`` marker is in it, so an interrupted run leaves nothing that looks finished.

The CIFAR-10 archive writer (``synth-cifar``) is ``pipeline.data.prep.synth_cifar``; it draws the
same shapes.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.host import pool_context, process_alive, usable_cpus

MARKER = ".complete"
PARAMS_FILE = ".synth.json"
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "arrow")
TEXTURES = ("stripes", "checker", "dots", "solid")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SynthSpec:
    classes: int
    train_per_class: int
    val_per_class: int
    seed: int
    version: int = 1  # bump when the renderer changes, so a stale folder is not taken as current


def class_name(c: int) -> str:
    """WordNet-id-like folder name, so tools that expect ``n\\d{8}`` folders accept synthetic data."""
    return f"n{c:08d}"


# ---------------------------------------------------------------- drawing


def _class_style(c: int) -> dict[str, Any]:
    """A class's fixed appearance: shape, hue, texture and texture frequency/angle."""
    golden = 0.61803398875
    return {
        "shape": SHAPES[c % len(SHAPES)],
        # Consecutive classes get far-apart hues; classes that share a shape differ in hue and texture.
        "hue": (c * golden) % 1.0,
        "texture": TEXTURES[(c + c // len(SHAPES)) % len(TEXTURES)],
        "angle": (c * 37) % 180,
        "period": 6 + (c * 5) % 9,
    }


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ngon(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for k in range(n * len(radii)):
            a = rot + offset + 2 * math.pi * k / (n * len(radii))
            rr = r * radii[k % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ngon(4, [1.0], math.pi / 4)
    if shape == "triangle":
        return ngon(3, [1.0])
    if shape == "star":
        return ngon(5, [1.0, 0.45])
    if shape == "diamond":
        pts = ngon(4, [1.0])
        return [(cx + (x - cx) * 0.6, y) if i % 2 == 0 else (x, y) for i, (x, y) in enumerate(pts)]
    if shape == "hexagon":
        return ngon(6, [1.0])
    if shape == "cross":
        w = 0.33
        base = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
    elif shape == "arrow":
        base = [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    else:
        raise ValueError(shape)
    cos, sin = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in base]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill: Any
) -> None:
    """Draw a filled shape on a mask or image; ``fill`` may be a colour or 255 for masks."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        draw.ellipse(
            (cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0 if fill == 255 else None
        )
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        dx, dy = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot)
        draw.ellipse(
            (cx + dx - 0.8 * r, cy + dy - 0.8 * r, cx + dx + 0.8 * r, cy + dy + 0.8 * r),
            fill=0 if fill == 255 else None,
        )
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, rot), fill=fill)


def _texture(style: dict[str, Any], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] float RGB (0-255) in the class colour, modulated by the class texture."""
    hue = (style["hue"] + rng.uniform(-0.03, 0.03)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 1.0))) * 255
    yy, xx = np.ogrid[0:h, 0:w]  # broadcast, not materialised: the texture is the hot loop
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    period = style["period"] * rng.uniform(0.85, 1.2)
    a = math.radians(style["angle"] + rng.uniform(-10, 10))
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    kind = style["texture"]
    if kind == "stripes":
        pattern = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "checker":
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "dots":
        pattern = ((np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)) > 0.35).astype(
            np.float32
        )
    else:
        pattern = np.ones((h, w), np.float32)
    shade = np.broadcast_to(0.55 + 0.45 * pattern, (h, w))
    return rgb.astype(np.float32)[None, None, :] * shade[..., None]


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field, upsampled from a few random pixels."""
    k = int(rng.integers(2, 5))
    coarse = rng.uniform(20, 235, size=(k, k, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)


def render_image(
    style_class: int, size: tuple[int, int], rng: np.random.Generator, clutter: bool = True
) -> Image.Image:
    """One synthetic image of class ``style_class``.

    Args:
        style_class: the class whose shape/colour/texture is drawn.
        size: (width, height).
        rng: the only source of randomness, so the image is a pure function of its seed.
        clutter: draw distractor shapes (off for tiny CIFAR images where they would hide the object).
    """
    w, h = size
    short = min(w, h)
    img = _background(h, w, rng)
    canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if clutter:
        # Distractors: solid shapes of any kind in random colours, smaller than the object.
        for _ in range(int(rng.integers(2, 6))):
            r = short * rng.uniform(0.05, 0.14)
            colour = tuple(int(x) for x in rng.integers(0, 256, 3))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            _draw_shape(
                draw, shape, rng.uniform(0, w), rng.uniform(0, h), r, rng.uniform(0, 2 * math.pi), colour
            )
    # The object: class shape, textured in the class colour, with position/scale/rotation jitter.
    style = _class_style(style_class)
    r = short * rng.uniform(0.18, 0.32)
    cx = rng.uniform(r * 0.8, w - r * 0.8)
    cy = rng.uniform(r * 0.8, h - r * 0.8)
    # Mask and texture only over the object's bounding box: the full-frame version was the hot spot.
    x0, y0 = max(0, int(cx - 1.5 * r)), max(0, int(cy - 1.5 * r))
    x1, y1 = min(w, int(cx + 1.5 * r) + 1), min(h, int(cy + 1.5 * r) + 1)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    _draw_shape(ImageDraw.Draw(mask), style["shape"], cx - x0, cy - y0, r, rng.uniform(0, 2 * math.pi), 255)
    if short >= 64:
        mask = mask.filter(ImageFilter.GaussianBlur(1.0))
    tex = Image.fromarray(_texture(style, y1 - y0, x1 - x0, rng).clip(0, 255).astype(np.uint8))
    canvas.paste(tex, (x0, y0), mask)
    out = np.asarray(canvas, dtype=np.float32)
    out += rng.standard_normal(size=out.shape, dtype=np.float32) * np.float32(rng.uniform(4, 14))
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(200, 501))
    long = int(round(short * rng.uniform(1.0, 16 / 9)))  # square to 16:9; 3:4 once rotated
    return (long, short) if rng.random() < 0.5 else (short, long)


def _write_one(task: tuple[str, int, int, int, int]) -> int:
    path, seed, split, c, i = task
    # One independent stream per image: the output does not depend on worker count or order.
    rng = np.random.default_rng([seed, split, c, i])
    img = render_image(c, _image_size(rng), rng)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


# ---------------------------------------------------------------- atomic output folder


def _prepare_out(out: Path, params: dict[str, Any], force: bool) -> bool:
    """Check ``out`` may be (re)written; True when it already holds exactly this dataset."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    entries = [e for e in os.listdir(out)]
    if not entries:
        return False
    params_file = out / PARAMS_FILE
    if not params_file.is_file():
        raise FileExistsError(
            f"{out}: folder is not empty and was not written by this tool; refusing to overwrite it "
            "(choose another --out or remove it yourself)"
        )
    try:
        old = json.loads(params_file.read_text())
    except (OSError, ValueError):
        old = None
    if old == params and (out / MARKER).is_file():
        return True
    if not force:
        raise FileExistsError(
            f"{out}: holds a different or incomplete synthetic dataset ({old}); pass --force to replace it"
        )
    return False


def _clean_stale_tmp(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):  # a live writer's is left alone
            shutil.rmtree(p, ignore_errors=True)


def _commit(tmp: Path, out: Path, params: dict[str, Any]) -> None:
    (tmp / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True) + "\n")
    (tmp / MARKER).write_text("")
    trash = None
    if out.exists():
        if any(out.iterdir()):
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
        else:
            out.rmdir()
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_synthetic_imagenet(
    out_dir: str | os.PathLike[str],
    classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a synthetic ImageNet-layout dataset; deterministic for a seed.

    Args:
        out_dir: destination; must not exist, be empty, or hold an earlier synthetic dataset.
        classes: number of classes (folders ``n00000000`` ...).
        train_per_class: training images per class.
        val_per_class: validation images per class.
        seed: the output is a pure function of (classes, counts, seed).
        workers: processes to render with; default all CPUs this process may use.
        force: replace an earlier synthetic dataset with different parameters.

    Returns:
        A summary: path, counts, bytes, seconds, and whether it was already up to date.
    """
    if classes <= 0 or train_per_class <= 0 or val_per_class <= 0:
        raise ValueError(
            f"classes ({classes}), train_per_class ({train_per_class}) and val_per_class ({val_per_class}) "
            "must all be positive"
        )
    out = Path(out_dir).expanduser().absolute()
    spec = SynthSpec(classes, train_per_class, val_per_class, seed)
    params = {"kind": "imagenet", **asdict(spec)}
    summary = {"out": str(out), "train": classes * train_per_class, "val": classes * val_per_class}
    if _prepare_out(out, params, force):
        return {**summary, "up_to_date": True, "bytes": 0, "seconds": 0.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    tasks = []
    try:
        for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for c in range(classes):
                d = tmp / split / class_name(c)
                d.mkdir(parents=True)
                stem = class_name(c) if split == "train" else f"val_{class_name(c)}"
                tasks += [(str(d / f"{stem}_{i:06d}.JPEG"), seed, split_id, c, i) for i in range(per_class)]
        n = min(workers or usable_cpus(), len(tasks))
        if n > 1:
            with pool_context().Pool(n) as pool:  # the work is pure: any start method is correct
                sizes = pool.map(_write_one, tasks, chunksize=max(1, len(tasks) // (n * 8)))
        else:
            sizes = [_write_one(t) for t in tasks]
        _commit(tmp, out, params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "up_to_date": False, "bytes": int(sum(sizes)), "seconds": time.perf_counter() - start}
