"""ImageNet housekeeping: check every image (``verify``) and sort the flat val folder (``prepare-val``).

    python -m pipeline data verify /data/imagenet            # lists problems, exit 1 if any
    python -m pipeline data verify /data/imagenet --fix      # repairs or quarantines them
    python -m pipeline data prepare-val --val /data/imagenet/val --labels LOC_val_solution.csv
    python -m pipeline data prepare-val --val /data/imagenet/val --undo

The ILSVRC-2012 download holds a few files that stop a long run hours in: one PNG and 22
CMYK JPEGs under .JPEG names, and local copies are sometimes empty or truncated. ``--fix``
rewrites the decodable ones as RGB JPEG (keeping the original under the quarantine folder) and
moves the undecodable ones out of the class folders, so nothing is ever deleted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.constants import IMAGE_SUFFIXES
from pipeline.data.image_check import check_image
from pipeline.data.layout import DataLayoutError
from pipeline.host import pool_context, usable_cpus

QUARANTINE = ".quarantine"  # under ROOT, outside train/ and val/, hidden from the layout scan
MANIFEST = "manifest.jsonl"
VAL_MANIFEST = ".prepare-val-manifest.json"
FIXED_JPEG_QUALITY = 95

# Problem kinds that can be repaired in place; the others ("empty", "truncated", "undecodable")
# leave the class folders.
REWRITE = {"png", "cmyk", "not_jpeg"}


@dataclass
class Problem:
    path: str  # relative to the verified root
    kind: str
    reason: str
    action: str = ""  # what --fix did: "rewritten as RGB JPEG" / "quarantined to ..." / "fix failed: ..."


@dataclass
class VerifyReport:
    root: str
    checked: int
    problems: list[Problem] = field(default_factory=list)
    quarantine: str | None = None

    @property
    def remaining(self) -> int:
        """Problems not repaired: what makes ``verify`` exit 1."""
        return sum(1 for p in self.problems if not p.action or p.action.startswith("fix failed"))

    def summary(self) -> str:
        fixed = len(self.problems) - self.remaining
        return (
            f"{self.root}: checked {self.checked} images, {len(self.problems)} problems, "
            f"{fixed} fixed, {self.remaining} remaining"
            + (f" (quarantine: {self.quarantine})" if self.quarantine and fixed else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "checked": self.checked,
            "remaining": self.remaining,
            "quarantine": self.quarantine,
            "problems": [asdict(p) for p in self.problems],
        }


# ---------------------------------------------------------------- verify


def _image_files(root: Path) -> list[str]:
    """Every image file under root (relative paths, sorted), skipping hidden folders like the quarantine."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def _check_task(args: tuple[str, str]) -> tuple[str, tuple[str, str] | None]:
    root, rel = args
    return rel, check_image(os.path.join(root, rel))


def _rewrite_rgb_jpeg(path: Path, keep_original: Path) -> None:
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    keep_original.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, keep_original)
    tmp = path.with_name(f".{path.name}.fixing")
    rgb.save(tmp, format="JPEG", quality=FIXED_JPEG_QUALITY)
    os.replace(tmp, path)  # atomic: a reader sees either the old file or the whole new one
    if check_image(path) is not None:
        raise OSError("the rewritten file does not verify")


def verify_images(
    root: str | os.PathLike[str], *, fix: bool = False, workers: int | None = None
) -> VerifyReport:
    """Decode every image under ``root``; optionally repair or quarantine the bad ones.

    Args:
        root: a dataset root (or any folder of images); hidden folders are skipped.
        fix: rewrite PNG/CMYK/other decodable non-JPEG files as RGB JPEG in place (the original is
            kept under ``root/.quarantine/originals/``) and move empty, truncated and undecodable
            files to ``root/.quarantine/<same relative path>``; every action goes to
            ``root/.quarantine/manifest.jsonl``.
        workers: processes (default: every CPU this process may use).

    Returns:
        The report; ``report.remaining`` counts problems still in place.
    """
    root_path = Path(root).expanduser().absolute()
    if not root_path.is_dir():
        raise DataLayoutError(f"{root_path}: not a folder; pass the dataset root (with train/ and val/)")
    files = _image_files(root_path)
    tasks = [(str(root_path), rel) for rel in files]
    n = min(workers or usable_cpus(), max(1, len(tasks)))
    if n > 1 and len(tasks) > 1:
        with pool_context().Pool(n) as pool:
            results = list(
                pool.imap_unordered(_check_task, tasks, chunksize=max(1, min(256, len(tasks) // (n * 4))))
            )
    else:
        results = [_check_task(t) for t in tasks]
    problems = sorted((Problem(rel, *found) for rel, found in results if found), key=lambda p: p.path)
    quarantine = root_path / QUARANTINE
    report = VerifyReport(str(root_path), len(files), problems, str(quarantine))
    if fix and problems:
        _fix(root_path, quarantine, problems)
    return report


def _fix(root: Path, quarantine: Path, problems: list[Problem]) -> None:
    quarantine.mkdir(exist_ok=True)
    with open(quarantine / MANIFEST, "a") as manifest:
        for p in problems:
            src = root / p.path
            try:
                if p.kind in REWRITE:
                    original = quarantine / "originals" / p.path
                    _rewrite_rgb_jpeg(src, original)
                    p.action = "rewritten as RGB JPEG"
                    entry = {
                        "path": p.path,
                        "reason": p.reason,
                        "action": "rewritten",
                        "original": str(original),
                    }
                else:
                    dst = quarantine / p.path
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if dst.exists():  # quarantined before under the same name: keep both
                        dst = dst.with_name(f"{dst.stem}.{os.getpid()}{dst.suffix}")
                    shutil.move(src, dst)
                    p.action = f"quarantined to {dst.relative_to(root)}"
                    entry = {
                        "path": p.path,
                        "reason": p.reason,
                        "action": "quarantined",
                        "moved_to": str(dst),
                    }
            except Exception as e:  # report and go on: one stubborn file must not stop the others
                p.action = f"fix failed: {e}"
                entry = {"path": p.path, "reason": p.reason, "action": "failed", "error": str(e)}
            manifest.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------- prepare-val


def _read_synsets(path: Path) -> list[str]:
    wnids = []
    for line in path.read_text().splitlines():
        if line.strip():
            wnids.append(line.split()[0].strip(","))
    if not wnids:
        raise DataLayoutError(f"{path}: no synsets listed; expected one wnid (e.g. n01440764) per line")
    return wnids


def read_val_labels(labels: Path, synsets: Path | None = None) -> dict[str, str]:
    """Image stem (``ILSVRC2012_val_00000001``) -> wnid, from any supported ground-truth file.

    Args:
        labels: ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``); or the devkit's
            ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based class id per line, in file
            order), which needs ``synsets``; or lines of ``<file name> <wnid>``.
        synsets: the wnids in the devkit's id order, one per line (first token per line).
    """
    if not labels.is_file():
        raise DataLayoutError(f"{labels}: labels file not found")
    text = labels.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataLayoutError(f"{labels}: empty labels file")
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        mapping = {}
        for row in csv.DictReader(io.StringIO(text)):
            pred = (row.get("PredictionString") or "").split()
            if not pred:
                raise DataLayoutError(f"{labels}: row for {row.get('ImageId')!r} has no class")
            mapping[row["ImageId"].strip()] = pred[0]
        return mapping
    if all(ln.strip().isdigit() for ln in lines):
        if synsets is None:
            raise DataLayoutError(
                f"{labels}: holds class ids only (the devkit ground truth); pass --synsets with the wnids "
                "in the devkit's id order, or use LOC_val_solution.csv instead"
            )
        order = _read_synsets(synsets)
        if len(order) == 1000 and order == sorted(order):
            # The devkit numbers classes in meta.mat order (id 1 = n02119789), which is not sorted;
            # a sorted list (e.g. LOC_synset_mapping.txt) would silently mislabel every image.
            raise DataLayoutError(
                f"{synsets}: synsets are in sorted wnid order, but {labels.name} numbers classes in the "
                "devkit's meta.mat order (id 1 = n02119789); export that order from meta.mat, one wnid per "
                "line, or use LOC_val_solution.csv"
            )
        mapping = {}
        for i, ln in enumerate(lines, start=1):
            k = int(ln)
            if not 1 <= k <= len(order):
                raise DataLayoutError(f"{labels}:{i}: class id {k} is outside 1..{len(order)} of {synsets}")
            mapping[f"ILSVRC2012_val_{i:08d}"] = order[k - 1]
        return mapping
    mapping = {}
    for i, ln in enumerate(lines, start=1):
        parts = ln.replace(",", " ").split()
        if len(parts) != 2:
            raise DataLayoutError(
                f"{labels}:{i}: cannot parse {ln!r}; expected LOC_val_solution.csv, the devkit ground truth "
                "(one id per line, with --synsets) or '<file> <wnid>' lines"
            )
        mapping[Path(parts[0]).stem] = parts[1]
    return mapping


def prepare_val(
    val_dir: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    *,
    synsets: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
) -> tuple[int, int]:
    """Move ``val_dir/*.JPEG`` into ``val_dir/<wnid>/``, writing a manifest first so it can be undone.

    Args:
        val_dir: the flat val folder.
        labels: ground truth (see ``read_val_labels``).
        synsets: wnid order for the devkit ground truth.
        dry_run: check everything, move nothing.

    Returns:
        (images moved, class folders).

    Raises:
        DataLayoutError: already prepared, nothing to move, or the images and labels disagree.
    """
    val = Path(val_dir).expanduser().absolute()
    if not val.is_dir():
        raise DataLayoutError(f"{val}: val folder not found")
    if (val / VAL_MANIFEST).exists():
        raise DataLayoutError(
            f"{val}: already prepared (found {VAL_MANIFEST}); run with --undo first to redo it"
        )
    flat = sorted(
        e.name
        for e in os.scandir(val)
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
    )
    if not flat:
        raise DataLayoutError(
            f"{val}: no images lying directly in it; nothing to sort (already in class folders?)"
        )
    mapping = read_val_labels(Path(labels), Path(synsets) if synsets else None)
    stems = {os.path.splitext(n)[0]: n for n in flat}
    missing_label = sorted(set(stems) - set(mapping))
    missing_image = sorted(set(mapping) - set(stems))
    if missing_label or missing_image:
        detail = []
        if missing_label:
            detail.append(f"{len(missing_label)} images have no label (e.g. {stems[missing_label[0]]})")
        if missing_image:
            detail.append(f"{len(missing_image)} labels have no image (e.g. {missing_image[0]})")
        raise DataLayoutError(
            f"{val}: {len(flat)} images but {len(mapping)} labels in {labels}: {'; '.join(detail)}. "
            "Refusing to sort a partial or mismatched val set"
        )
    moves = [(name, f"{mapping[os.path.splitext(name)[0]]}/{name}") for name in flat]
    classes = len({dst.split("/")[0] for _, dst in moves})
    if dry_run:
        return len(moves), classes
    # The manifest goes down first (atomically), so an interrupted run can still be undone.
    tmp = val / f"{VAL_MANIFEST}.tmp"
    tmp.write_text(json.dumps({"labels": str(labels), "moves": moves}))
    os.replace(tmp, val / VAL_MANIFEST)
    for src, dst in moves:
        (val / dst).parent.mkdir(exist_ok=True)
        os.rename(val / src, val / dst)
    return len(moves), classes


def undo_prepare_val(val_dir: str | os.PathLike[str]) -> int:
    """Reverse ``prepare_val`` from its manifest; returns the number of images moved back.

    Args:
        val_dir: the val folder that ``prepare_val`` sorted.
    """
    val = Path(val_dir).expanduser().absolute()
    manifest = val / VAL_MANIFEST
    if not manifest.is_file():
        raise DataLayoutError(
            f"{val}: no {VAL_MANIFEST}; nothing to undo (prepare-val did not sort this folder)"
        )
    moves = json.loads(manifest.read_text())["moves"]
    moved = 0
    for src, dst in moves:
        if (val / dst).exists() and not (val / src).exists():
            os.rename(val / dst, val / src)
            moved += 1
    for cls in sorted({dst.split("/")[0] for _, dst in moves}):
        try:
            (val / cls).rmdir()  # only if empty: never remove anything a user put there since
        except OSError:
            pass
    manifest.unlink()
    return moved
