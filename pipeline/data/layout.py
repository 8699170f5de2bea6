"""The ImageNet folder layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    index = scan_imagenet("/data/imagenet")
    print(len(index.classes), len(index.train_files), len(index.val_files))

Class indices are the positions of the train class folders in sorted order (the
torchvision ImageFolder convention), so val labels and checkpoints agree across machines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.constants import IMAGE_SUFFIXES


class DataLayoutError(ValueError):
    """The dataset folder is not in the expected layout; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageFolderIndex:
    """Every image path of a dataset with its class index; paths are absolute strings."""

    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    val_files: tuple[str, ...]
    val_labels: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _class_dirs(split_dir: Path) -> tuple[list[str], list[str]]:
    """(sorted class folder names, image files lying directly in split_dir)."""
    classes, loose = [], []
    with os.scandir(split_dir) as it:
        for entry in it:
            if entry.name.startswith("."):  # .quarantine, .ipynb_checkpoints, ...
                continue
            if entry.is_dir():
                classes.append(entry.name)
            elif _is_image(entry.name):
                loose.append(entry.name)
    return sorted(classes), sorted(loose)


def _images(class_dir: Path) -> list[str]:
    with os.scandir(class_dir) as it:
        names = [e.name for e in it if _is_image(e.name) and not e.name.startswith(".") and e.is_file()]
    return [str(class_dir / n) for n in sorted(names)]


def _split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise DataLayoutError(
            f"{path}: missing {split}/ folder; expected {root}/{split}/<class>/<image>.JPEG "
            "(see `python -m pipeline data synth` for a small example layout)"
        )
    return path


def scan_imagenet(root: str | os.PathLike[str]) -> ImageFolderIndex:
    """Index an ImageNet-layout folder, checking the layout as it goes.

    Args:
        root: folder holding ``train/`` and ``val/``, each with one sub-folder per class.

    Returns:
        The sorted, deterministic index; labels are positions in the sorted train classes.

    Raises:
        DataLayoutError: the root or a split is missing, a split has no class folders, a class
            folder holds no images, a val class is not a train class, or val/ is flat.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataLayoutError(
            f"{root}: dataset root does not exist; pass data.root=/path/to/imagenet "
            "(a folder with train/ and val/) or generate one with `python -m pipeline data synth --out DIR`"
        )
    train_dir = _split_dir(root, "train")
    val_dir = _split_dir(root, "val")

    classes, loose_train = _class_dirs(train_dir)
    if not classes:
        raise DataLayoutError(
            f"{train_dir}: no class folders; expected {train_dir}/<class>/<image>.JPEG"
            + (f" (found {len(loose_train)} images lying directly in it)" if loose_train else "")
        )
    class_to_idx = {c: i for i, c in enumerate(classes)}

    val_classes, loose_val = _class_dirs(val_dir)
    if loose_val:
        raise DataLayoutError(
            f"{val_dir}: holds {len(loose_val)} images directly (e.g. {loose_val[0]}), the flat layout of the "
            "ImageNet download; sort them into class folders with "
            f"`python -m pipeline data prepare-val --val {val_dir} --labels LOC_val_solution.csv`"
        )
    if not val_classes:
        raise DataLayoutError(f"{val_dir}: no class folders; expected {val_dir}/<class>/<image>.JPEG")
    unknown = [c for c in val_classes if c not in class_to_idx]
    if unknown:
        raise DataLayoutError(
            f"{val_dir / unknown[0]}: val class {unknown[0]!r} is not a train class"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; every val/<class> folder needs a matching {train_dir}/<class>"
        )

    def collect(split_dir: Path, names: list[str]) -> tuple[list[str], list[int]]:
        files: list[str] = []
        labels: list[int] = []
        for name in names:
            images = _images(split_dir / name)
            if not images:
                raise DataLayoutError(
                    f"{split_dir / name}: class folder {name!r} holds no images (*.JPEG, *.jpg, *.jpeg); "
                    "remove the folder or restore its images"
                )
            files += images
            labels += [class_to_idx[name]] * len(images)
        return files, labels

    train_files, train_labels = collect(train_dir, classes)
    val_files, val_labels = collect(val_dir, val_classes)
    return ImageFolderIndex(
        classes=tuple(classes),
        train_files=tuple(train_files),
        train_labels=tuple(train_labels),
        val_files=tuple(val_files),
        val_labels=tuple(val_labels),
    )
