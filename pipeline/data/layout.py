"""The ImageNet folder layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    index = scan_imagenet("/data/imagenet")            # or "s3://bucket/imagenet"
    print(len(index.classes), len(index.train_files), len(index.val_files))
    write_index("s3://bucket/imagenet")                # python -m pipeline data index ROOT

Class indices are the positions of the train class folders in sorted order (the
torchvision ImageFolder convention), so val labels and checkpoints agree across machines.

The root may be a local folder or a URI (``s3://``, ``gs://``). Listing ImageNet's 1.33M
objects in a bucket takes minutes, so ``write_index`` stores the listing once, next to the
data, as ``ROOT/pipeline-index.json.gz`` (every image name by split and class, relative to
the root, so the dataset and its index can be copied together). ``scan_imagenet`` uses it
when present, after a cheap check against the folders (``check_index``).
"""

from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.constants import IMAGE_SUFFIXES
from pipeline.store import locations

INDEX_NAME = "pipeline-index.json.gz"
INDEX_FORMAT = "resnet-pipeline/imagenet-index"
INDEX_VERSION = 1
SPOT_CHECK_CLASSES = 8  # class folders per split listed in full when an index is checked

# class name -> sorted image names directly in that class folder
Split = dict[str, list[str]]


class DataLayoutError(ValueError):
    """The dataset folder is not in the expected layout; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageFolderIndex:
    """Every image path of a dataset with its class index; absolute paths or URIs."""

    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    val_files: tuple[str, ...]
    val_labels: tuple[int, ...]
    index_file: str | None = field(default=None, compare=False)  # the index it came from, if any

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .quarantine, .ipynb_checkpoints, ...


def _normal_root(root: str | os.PathLike[str]) -> str:
    if locations.is_uri(root):
        return str(root).rstrip("/")
    return str(Path(root).expanduser().absolute())


def _remote_error(location: str, e: OSError) -> DataLayoutError:
    return DataLayoutError(f"{location}: cannot be read ({e}); {locations.access_hint(location)}")


# ---------------------------------------------------------------- listing one split


def _list_split(split_dir: str) -> tuple[Split, list[str]]:
    """(class -> image names, image names lying directly in the split folder)."""
    if locations.is_uri(split_dir):
        return _list_split_remote(split_dir)
    classes: Split = {}
    loose: list[str] = []
    with os.scandir(split_dir) as it:
        for entry in it:
            if _hidden(entry.name):
                continue
            if entry.is_dir():
                classes[entry.name] = _local_images(os.path.join(split_dir, entry.name))
            elif _is_image(entry.name):
                loose.append(entry.name)
    return dict(sorted(classes.items())), sorted(loose)


def _local_images(class_dir: str) -> list[str]:
    with os.scandir(class_dir) as it:
        return sorted(e.name for e in it if _is_image(e.name) and not _hidden(e.name) and e.is_file())


def _list_split_remote(split_dir: str) -> tuple[Split, list[str]]:
    classes: Split = {}
    loose: list[str] = []
    try:
        entries = locations.list_tree(split_dir)
    except OSError as e:
        raise _remote_error(split_dir, e) from None
    for rel, is_dir in entries:
        parts = rel.split("/")
        if any(_hidden(p) for p in parts):
            continue
        if len(parts) == 1 and is_dir:
            classes.setdefault(parts[0], [])
        elif len(parts) == 1 and _is_image(parts[0]):
            loose.append(parts[0])
        elif len(parts) == 2 and not is_dir and _is_image(parts[1]):
            classes.setdefault(parts[0], []).append(parts[1])
    return {c: sorted(classes[c]) for c in sorted(classes)}, sorted(loose)


def _class_folders(split_dir: str) -> list[str]:
    if locations.is_uri(split_dir):
        try:
            dirs, _ = locations.list_dir(split_dir)
        except OSError as e:
            raise _remote_error(split_dir, e) from None
        return [d for d in dirs if not _hidden(d)]
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not _hidden(e.name))


def _class_images(split_dir: str, name: str) -> list[str]:
    folder = locations.join(split_dir, name)
    if not locations.is_uri(folder):
        return _local_images(folder) if os.path.isdir(folder) else []
    try:
        _, files = locations.list_dir(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _remote_error(folder, e) from None
    return [f for f in files if _is_image(f) and not _hidden(f)]


def _is_dir(location: str) -> bool:
    if not locations.is_uri(location):
        return os.path.isdir(location)
    try:
        return locations.kind(location) == "dir"
    except OSError as e:
        raise _remote_error(location, e) from None


# ---------------------------------------------------------------- the full scan


def _split_dir(root: str, split: str) -> str:
    path = locations.join(root, split)
    if not _is_dir(path):
        raise DataLayoutError(
            f"{path}: missing {split}/ folder; expected {root}/{split}/<class>/<image>.JPEG "
            "(see `python -m pipeline data synth` for a small example layout)"
        )
    return path


def _check_root(root: str) -> None:
    if not _is_dir(root):
        raise DataLayoutError(
            f"{root}: dataset root does not exist; pass data.root=/path/to/imagenet or s3://bucket/prefix "
            "(a folder with train/ and val/) or generate one with `python -m pipeline data synth --out DIR`"
        )


def _scan_folders(root: str) -> tuple[Split, Split]:
    """List both splits and check the layout; returns (train, val) as class -> image names."""
    _check_root(root)
    train_dir, val_dir = _split_dir(root, "train"), _split_dir(root, "val")
    train, loose_train = _list_split(train_dir)
    if not train:
        raise DataLayoutError(
            f"{train_dir}: no class folders; expected {train_dir}/<class>/<image>.JPEG"
            + (f" (found {len(loose_train)} images lying directly in it)" if loose_train else "")
        )
    val, loose_val = _list_split(val_dir)
    if loose_val:
        raise DataLayoutError(
            f"{val_dir}: holds {len(loose_val)} images directly (e.g. {loose_val[0]}), the flat layout of the "
            "ImageNet download; sort them into class folders with "
            f"`python -m pipeline data prepare-val --val {val_dir} --labels LOC_val_solution.csv`"
        )
    if not val:
        raise DataLayoutError(f"{val_dir}: no class folders; expected {val_dir}/<class>/<image>.JPEG")
    unknown = [c for c in val if c not in train]
    if unknown:
        raise DataLayoutError(
            f"{locations.join(val_dir, unknown[0])}: val class {unknown[0]!r} is not a train class"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; every val/<class> folder needs a matching {train_dir}/<class>"
        )
    for split_dir, split in ((train_dir, train), (val_dir, val)):
        for name, images in split.items():
            if not images:
                raise DataLayoutError(
                    f"{locations.join(split_dir, name)}: class folder {name!r} holds no images (*.JPEG, *.jpg, *.jpeg); "
                    "remove the folder or restore its images"
                )
    return train, val


def _to_index(root: str, train: Split, val: Split, index_file: str | None = None) -> ImageFolderIndex:
    classes = sorted(train)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def flat(split: str, names: Split) -> tuple[tuple[str, ...], tuple[int, ...]]:
        files = [locations.join(root, split, c, n) for c in sorted(names) for n in names[c]]
        labels = [class_to_idx[c] for c in sorted(names) for _ in names[c]]
        return tuple(files), tuple(labels)

    train_files, train_labels = flat("train", train)
    val_files, val_labels = flat("val", val)
    return ImageFolderIndex(tuple(classes), train_files, train_labels, val_files, val_labels, index_file)


def scan_imagenet(root: str | os.PathLike[str], use_index: bool = True) -> ImageFolderIndex:
    """Index an ImageNet-layout folder or bucket prefix, checking the layout as it goes.

    Args:
        root: folder or URI holding ``train/`` and ``val/``, each with one sub-folder per class.
        use_index: read ``ROOT/pipeline-index.json.gz`` when present (after ``check_index``)
            instead of listing every image.

    Returns:
        The sorted, deterministic index; labels are positions in the sorted train classes.

    Raises:
        DataLayoutError: the root or a split is missing, a split has no class folders, a class
            folder holds no images, a val class is not a train class, val/ is flat, or the
            index file is unreadable or disagrees with the folders.
    """
    root = _normal_root(root)
    if use_index:
        found = read_index(root)
        if found is not None:
            path, train, val = found
            check_index(root, path, train, val)
            return _to_index(root, train, val, index_file=path)
    return _to_index(root, *_scan_folders(root))


# ---------------------------------------------------------------- the index file


def index_location(root: str | os.PathLike[str]) -> str:
    return locations.join(_normal_root(root), INDEX_NAME)


def write_index(root: str | os.PathLike[str]) -> tuple[str, ImageFolderIndex, int]:
    """List the folders (never an old index), check the layout, and write the index next to them.

    Returns:
        (where it was written, the dataset index, the file's size in bytes).
    """
    root = _normal_root(root)
    train, val = _scan_folders(root)
    doc = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": sorted(train),
        "train": train,
        "val": val,
    }
    data = gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0)
    path = index_location(root)
    try:
        locations.write_bytes(path, data)
    except OSError as e:
        raise _remote_error(path, e) from None
    return path, _to_index(root, train, val, index_file=path), len(data)


def read_index(root: str | os.PathLike[str]) -> tuple[str, Split, Split] | None:
    """(its location, train, val) from the index file, or None when there is none."""
    path = index_location(root)
    try:
        raw = locations.read_bytes(path)
    except OSError as e:
        raise _remote_error(path, e) from None
    if raw is None:
        return None
    fix = f"rewrite it with `python -m pipeline data index {_normal_root(root)}` or delete it"
    try:
        doc = json.loads(gzip.decompress(raw))
    except (OSError, EOFError, ValueError) as e:
        raise DataLayoutError(f"{path}: not a readable index ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise DataLayoutError(f"{path}: not a dataset index of this pipeline; {fix}")
    if doc.get("version") != INDEX_VERSION:
        raise DataLayoutError(
            f"{path}: index version {doc.get('version')!r}, this pipeline reads version {INDEX_VERSION}; {fix}"
        )
    train, val = doc.get("train"), doc.get("val")
    ok = (
        isinstance(train, dict)
        and isinstance(val, dict)
        and train
        and val
        and doc.get("classes") == sorted(train)
        and set(val) <= set(train)
        and all(isinstance(v, list) and v for v in [*train.values(), *val.values()])
    )
    if not ok:
        raise DataLayoutError(f"{path}: the index is inconsistent (classes, train and val disagree); {fix}")
    return path, train, val


def _spread(names: list[str], k: int) -> list[str]:
    """Up to ``k`` names spread evenly over the sorted list, first and last included."""
    if len(names) <= k:
        return list(names)
    return sorted({names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)})


def _differences(found: list[str], listed: list[str]) -> str:
    new, gone = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
    parts = []
    if new:
        parts.append(f"{len(new)} not in the index (e.g. {', '.join(new[:3])})")
    if gone:
        parts.append(f"{len(gone)} in the index but missing (e.g. {', '.join(gone[:3])})")
    return "; ".join(parts)


def check_index(root: str, path: str, train: Split, val: Split, spot: int = SPOT_CHECK_CLASSES) -> None:
    """Check an index against the folders cheaply, in a few listings whatever the dataset's size.

    Checked: the class folder names of ``train/`` and ``val/`` (one delimited listing each:
    on S3 one request per 1,000 classes), and every image name of ``spot`` classes per split,
    spread over the sorted classes (one listing each). That catches a renamed, added or
    missing class, a partial upload, and most edits; a file changed in an unchecked class is
    found by ``python -m pipeline data check-layout ROOT``, which lists everything.

    Raises:
        DataLayoutError: naming the index file, what differs, and the command that rebuilds it.
    """
    fix = (
        f"the data changed after the index was written: rebuild it with `python -m pipeline data index {root}` "
        "(or delete it to list the folders at every start)"
    )
    for split, names in (("train", train), ("val", val)):
        split_dir = _split_dir(root, split)
        diff = _differences(_class_folders(split_dir), sorted(names))
        if diff:
            raise DataLayoutError(f"{path}: stale index: class folders of {split_dir}: {diff}; {fix}")
        for name in _spread(sorted(names), spot):
            diff = _differences(_class_images(split_dir, name), names[name])
            if diff:
                raise DataLayoutError(
                    f"{path}: stale index: images of {locations.join(split_dir, name)}: {diff}; {fix}"
                )


def load_index(root: str | os.PathLike[str]) -> ImageFolderIndex | None:
    """The index file's dataset as is (not checked against the folders), or None when there is none."""
    found = read_index(root)
    return None if found is None else _to_index(_normal_root(root), found[1], found[2], index_file=found[0])


def compare_index(scanned: ImageFolderIndex, indexed: ImageFolderIndex) -> str | None:
    """None when both list the same classes and images, else what the index lacks or has extra."""
    problems = []
    for what, a, b in (
        ("classes", scanned.classes, indexed.classes),
        ("train images", scanned.train_files, indexed.train_files),
        ("val images", scanned.val_files, indexed.val_files),
    ):
        diff = _differences(list(a), list(b))
        if diff:
            problems.append(f"{what}: {diff}")
    return "; ".join(problems) or None
