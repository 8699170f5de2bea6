"""Data: ImageNet layout scan, DALI train/val loaders, CIFAR-10, dataset tools, synthetic data.

    from pipeline.data import scan_imagenet, build_train_loader, build_val_loader, build_cifar_loaders

Names resolve lazily so ``import pipeline.data`` costs nothing until a loader is built
(DALI and torchvision are only imported by the modules that need them).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataLayoutError": "pipeline.data.layout",
    "ImageFolderIndex": "pipeline.data.layout",
    "scan_imagenet": "pipeline.data.layout",
    "Loader": "pipeline.data.imagenet",
    "build_train_loader": "pipeline.data.imagenet",
    "build_val_loader": "pipeline.data.imagenet",
    "build_cifar_loaders": "pipeline.data.cifar",
    "write_synthetic_imagenet": "pipeline.data.synth",
    "write_synthetic_cifar": "pipeline.data.synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
