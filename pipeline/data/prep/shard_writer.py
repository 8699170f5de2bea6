"""``data shard``: WebDataset tars plus one manifest, written once from an ImageNet tree.

    python -m pipeline data shard /data/imagenet s3://bucket/imagenet-shards [--shard-size-mb 128]
    write_shards("/data/imagenet", "s3://bucket/imagenet-shards", shard_size_mb=128)

``OUT/train-000000.tar ...`` and ``OUT/val-000000.tar ...`` are plain tars in the WebDataset
convention: per sample ``KEY.jpg`` (the image's bytes as they were) and ``KEY.cls`` (the class
index as decimal text); ``KEY`` is the sample's 8-digit id within its split. Members have
mtime 0 and no owner, so the same source and settings give byte-identical shards. Training
samples are shuffled across shards with ``--seed``; validation samples keep the folder order.
``OUT/manifest.json.gz`` is written last, atomically; what it holds, and its reader, are in
``pipeline.data.shard_manifest``: what training needs at runtime, which never imports this module.

Writing: one process per usable CPU, one shard per task; a shard is assembled in memory,
written under a temporary name (an object store's PUT is atomic), read back through the fetch
engine and checked (size + SHA-256; a throttled store is waited out, not taken for a mismatch),
and only then recorded in ``OUT/.parts/<shard>.json``. A second run
re-plans (the plan is a pure function of the source listing and the settings), checks the
shards already there against their records (size and SHA-256) and writes only those missing
or bad, so running it again after an interruption, or after a shard was damaged, repairs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.fetch import stored_sha256
from pipeline.data.shard_manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SPLITS,
    manifest_location,
    normal_root,
)
from pipeline.store import locations

PARTS_DIR = ".parts"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a multiple of this
SOURCE_READS_IN_FLIGHT = 16  # per process, from an object-store SRC


def tool_version() -> str:
    try:
        import importlib.metadata

        return f"resnet-pipeline {importlib.metadata.version('resnet-pipeline')}"
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "resnet-pipeline (source)"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int  # shard number within the split
    name: str
    files: tuple[str, ...]  # source locations
    names: tuple[str, ...]  # relative to the source root
    labels: tuple[int, ...]
    first_id: int  # the split's sample id of the first sample


def _tar_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _sample_tar_bytes(size: int) -> int:
    return _tar_bytes(size) + _tar_bytes(4)  # KEY.jpg + KEY.cls (up to 4 digits)


def _sizes(split_dir: str) -> dict[str, int]:
    """Relative path -> size for every file under ``split_dir`` (one recursive listing)."""
    import pyarrow.fs

    fs, path = locations.filesystem(split_dir)
    base = path.rstrip("/") + "/"
    out = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True)):
        if info.type == pyarrow.fs.FileType.File and info.path.startswith(base):
            out[info.path[len(base) :]] = info.size
    return out


def plan_shards(src: str, *, shard_size_mb: float, seed: int) -> tuple[Any, list[ShardTask], str]:
    """(the source index, the shard tasks, the plan's digest): a pure function of the source and settings."""
    from pipeline.data.layout import scan_imagenet

    index = scan_imagenet(src)
    target = int(shard_size_mb * 1e6)
    tasks: list[ShardTask] = []
    fingerprint = hashlib.sha256()
    fingerprint.update(json.dumps([MANIFEST_VERSION, shard_size_mb, seed]).encode())
    for split in SPLITS:
        files = index.train_files if split == "train" else index.val_files
        labels = index.train_labels if split == "train" else index.val_labels
        split_dir = locations.join(src, split)
        sizes = _sizes(split_dir)
        rel = [f[len(split_dir) + 1 :] for f in files]
        order = (
            np.random.default_rng(seed).permutation(len(files)) if split == "train" else np.arange(len(files))
        )
        groups: list[list[int]] = [[]]
        used = 0
        for i in order:
            b = _sample_tar_bytes(sizes.get(rel[i], 0))
            if groups[-1] and used + b > target:
                groups.append([])
                used = 0
            groups[-1].append(int(i))
            used += b
        first = 0
        for k, g in enumerate(groups):
            names = tuple(f"{split}/{rel[i]}" for i in g)
            task = ShardTask(split, k, shard_name(split, k), tuple(files[i] for i in g), names,
                             tuple(int(labels[i]) for i in g), first)  # fmt: skip
            tasks.append(task)
            fingerprint.update(
                json.dumps([task.name, names, task.labels, [sizes.get(rel[i], 0) for i in g]]).encode()
            )
            first += len(g)
    return index, tasks, fingerprint.hexdigest()


# ---------------------------------------------------------------- writing one shard


def _read_source(location: str) -> bytes:
    if not locations.is_uri(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = locations.filesystem(location)
    with fs.open_input_file(path) as f:
        return f.read_at(f.size(), 0)  # one GET per image (the source's own layout)


def build_tar(task: ShardTask) -> tuple[bytes, list[dict[str, int]]]:
    """The shard's bytes and, per sample, its JPEG's offset, size and CRC-32."""
    buf = io.BytesIO()
    records = []
    if task.files and locations.is_uri(task.files[0]):
        # One GET per source image: many in flight, or each process waits out every latency.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(SOURCE_READS_IN_FLIGHT) as pool:
            contents = list(pool.map(_read_source, task.files))
    else:
        contents = [_read_source(f) for f in task.files]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, (data, label) in enumerate(zip(contents, task.labels, strict=True)):
            key = f"{task.first_id + j:08d}"
            for suffix, payload in ((".jpg", data), (".cls", str(label).encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                info.uname = info.gname = ""
                header_at = tar.offset
                tar.addfile(info, io.BytesIO(payload))
                if suffix == ".jpg":  # a USTAR header with a short name is one block
                    records.append(
                        {"offset": header_at + TAR_BLOCK, "size": len(data), "crc32": zlib.crc32(data)}
                    )
    out = buf.getvalue()
    for rec in records:  # the offsets are what a reader of the manifest will trust
        if zlib.crc32(out[rec["offset"] : rec["offset"] + rec["size"]]) != rec["crc32"]:
            raise AssertionError(f"{task.name}: sample at {rec['offset']} misplaced")
    return out, records


def _write_shard(args: tuple[ShardTask, str, str]) -> dict[str, Any]:
    task, out, plan = args
    data, records = build_tar(task)
    sha = hashlib.sha256(data).hexdigest()
    target = locations.join(out, task.name)
    locations.write_bytes(target, data)  # local: a temporary name, then renamed; S3: one atomic PUT
    # Through the fetch engine: a throttled read-back is retried, or named as throttled (FetchError).
    if stored_sha256(target, len(data)) != sha:
        raise OSError(f"{target}: what was read back differs from what was written; run the command again")
    part = {"plan": plan, "name": task.name, "size": len(data), "sha256": sha, "samples": records}
    locations.write_bytes(locations.join(out, PARTS_DIR, task.name + ".json"), json.dumps(part).encode())
    return part


def _existing_part(task: ShardTask, out: str, plan: str) -> dict[str, Any] | None:
    """The record of a shard written by an earlier run with the same plan, if the shard is intact."""
    raw = locations.read_bytes(locations.join(out, PARTS_DIR, task.name + ".json"))
    if raw is None:
        return None
    try:
        part = json.loads(raw)
    except ValueError:
        return None
    if part.get("plan") != plan or len(part.get("samples", ())) != len(task.files):
        return None
    if stored_sha256(locations.join(out, task.name), part["size"]) != part["sha256"]:
        return None
    return part


def _check_out(out: str, plan: str, force: bool) -> None:
    """OUT is new, empty, or holds this plan's shards (then it is resumed or repaired)."""
    raw = locations.read_bytes(manifest_location(out))
    if raw is not None:
        try:
            old = json.loads(gzip.decompress(raw)).get("plan")
        except (OSError, ValueError):
            old = None
        if old != plan and not force:
            raise FileExistsError(
                f"{out} holds shards of another source or settings (its {MANIFEST_NAME} has another plan); "
                "choose a new OUT, or pass --force to replace them"
            )
    if not locations.is_uri(out) and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another OUT")


def write_shards(
    src: str,
    out: str,
    *,
    shard_size_mb: float = 128,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    progress: Any = sys.stderr,
) -> dict[str, Any]:
    """Shard the ImageNet tree ``src`` into ``out``; resumable, see the module docstring.

    Args:
        src: ImageNet-layout root (local or ``s3://``/``gs://``), checked like ``data check-layout``.
        out: destination folder or bucket prefix.
        shard_size_mb: target shard size in MB (a shard holds at least one sample).
        seed: the shuffle of the training samples across shards.
        workers: processes (None: every usable CPU).
        force: replace shards of another plan in ``out``.
        progress: where progress lines go (None: nowhere).

    Returns:
        A summary: images, shards written / kept, bytes, seconds, images per second.
    """
    from pipeline.host import pool_context, usable_cpus

    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be positive, got {shard_size_mb}")
    src, out = normal_root(src), normal_root(out)
    if out == src or out.startswith(src.rstrip("/") + "/"):
        raise ValueError(f"OUT {out} is inside SRC {src}; choose a folder outside the source tree")
    start = time.perf_counter()
    index, tasks, plan = plan_shards(src, shard_size_mb=shard_size_mb, seed=seed)
    _check_out(out, plan, force)
    parts: dict[str, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        part = _existing_part(task, out, plan)
        if part is None:
            todo.append(task)
        else:
            parts[task.name] = part
    total = sum(len(t.files) for t in todo)
    _say(progress, f"{src}: {len(index.train_files)} train + {len(index.val_files)} val images -> "
         f"{len(tasks)} shards in {out} ({len(parts)} already there and intact, {len(todo)} to write)")  # fmt: skip
    workers = max(1, min(workers or usable_cpus(), len(todo) or 1))
    done = nbytes = 0
    t0 = last = time.perf_counter()
    if todo:
        with pool_context().Pool(workers) as pool:  # spawn once pyarrow's S3 threads run
            for part in pool.imap_unordered(_write_shard, [(t, out, plan) for t in todo]):
                parts[part["name"]] = part
                done += len(part["samples"])
                nbytes += part["size"]
                now = time.perf_counter()
                if now - last >= 2.0 or done == total:  # a line every 2 s at most
                    last, rate = now, done / max(now - t0, 1e-9)
                    _say(progress, f"  {len(parts)}/{len(tasks)} shards, {done}/{total} images, {rate:.0f} img/s, "
                         f"{nbytes / 1e6:.0f} MB, ETA {(total - done) / rate:.0f}s")  # fmt: skip
    _write_manifest(out, src, index, tasks, parts, plan, seed, shard_size_mb)
    _copy_mean(src, out)
    seconds = time.perf_counter() - start
    return {
        "out": out,
        "images": len(index.train_files) + len(index.val_files),
        "shards": len(tasks),
        "written": len(todo),
        "kept": len(tasks) - len(todo),
        "bytes": sum(p["size"] for p in parts.values()),
        "seconds": seconds,
        "images_per_s": (total / (time.perf_counter() - t0)) if todo else 0.0,
        "workers": workers,
    }


def _say(progress: Any, line: str) -> None:
    if progress is not None:
        print(line, file=progress, flush=True)


def _write_manifest(out, src, index, tasks, parts, plan, seed, shard_size_mb) -> None:
    splits: dict[str, dict[str, list]] = {
        s: {k: [] for k in ("shard", "offset", "size", "label", "crc32", "name")} for s in SPLITS
    }
    shards = []
    for k, task in enumerate(tasks):
        part = parts[task.name]
        shards.append({"name": task.name, "split": task.split, "size": part["size"], "sha256": part["sha256"],
                       "samples": len(task.files)})  # fmt: skip
        col = splits[task.split]
        for rec, label, name in zip(part["samples"], task.labels, task.names, strict=True):
            col["shard"].append(k)
            col["offset"].append(rec["offset"])
            col["size"].append(rec["size"])
            col["crc32"].append(rec["crc32"])
            col["label"].append(label)
            col["name"].append(name)
    doc = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tool": tool_version(),
        "source": src,
        "seed": seed,
        "shard_size_mb": shard_size_mb,
        "plan": plan,
        "classes": list(index.classes),
        "shards": shards,
        "splits": splits,
    }
    locations.write_bytes(manifest_location(out), gzip.compress(json.dumps(doc).encode(), mtime=0))


def _copy_mean(src: str, out: str) -> None:
    """``train_mean.npz`` (``data stats``) travels with the shards, so data.normalize=mean works there."""
    from pipeline.data.stats import mean_path

    data = locations.read_bytes(mean_path(src))
    if data is not None:
        locations.write_bytes(mean_path(out), data)


def iter_tar(path: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a local tar, in order (a reader for tests and tools)."""
    with tarfile.open(path) as tar:
        for member in tar:
            f = tar.extractfile(member)
            yield member.name, f.read() if f else b""
