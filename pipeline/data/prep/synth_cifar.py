"""A synthetic CIFAR-10 archive in the real python format, for demos and tests.

    python -m pipeline data synth-cifar --out data/synth-cifar --train-per-class 500 --test-per-class 100

``OUT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` pickled the way the real
(Python 2) archive is, so ``pickle.load(f, encoding="bytes")`` gives ``b"data"`` keys and
torchvision's ``encoding="latin1"`` gives ``"data"``. The images are the ImageNet synth's
shapes (``pipeline.data.prep.synth.render_image``) drawn at 64 px and downsampled to 32.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.constants import CIFAR_CLASSES, CIFAR_DIRNAME
from pipeline.data.prep.synth import render_image


class _Py2Str(bytes):
    """Bytes that pickle as a Python 2 ``str`` (BINSTRING), as in the real CIFAR-10 archive."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: _Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", n) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str

    def save_ndarray(self, arr: np.ndarray) -> None:
        # numpy's own reduce, but with the raw buffer as a Python 2 str, as numpy 1.x under
        # Python 2 wrote it; numpy reads it back under encoding="latin1" and encoding="bytes".
        from numpy._core.multiarray import _reconstruct

        state = (1, arr.shape, arr.dtype, False, _Py2Str(np.ascontiguousarray(arr).tobytes()))
        self.save_reduce(_reconstruct, (np.ndarray, (0,), _Py2Str(b"b")), state=state, obj=arr)

    dispatch[np.ndarray] = save_ndarray


def _dump_py2(obj: dict[str, Any], path: Path) -> None:
    def py2(v: Any) -> Any:
        if isinstance(v, str):
            return _Py2Str(v.encode("latin1"))
        if isinstance(v, list):
            return [py2(x) for x in v]
        return v

    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({_Py2Str(k.encode()): py2(v) for k, v in obj.items()})


def _cifar_images(labels: np.ndarray, rng_seed: list[int]) -> np.ndarray:
    """[N, 3072] uint8 rows in CIFAR's channel-planar order (1024 R, 1024 G, 1024 B)."""
    rows = np.empty((len(labels), 3072), np.uint8)
    for i, c in enumerate(labels):
        rng = np.random.default_rng([*rng_seed, i])
        # Drawn at 2x and downsampled, so shapes keep their outline at 32 px.
        img = render_image(int(c), (64, 64), rng, clutter=False).resize((32, 32), Image.BILINEAR)
        rows[i] = np.asarray(img, np.uint8).transpose(2, 0, 1).reshape(-1)
    return rows


def write_synthetic_cifar(
    out_dir: str | os.PathLike[str], train_per_class: int = 100, test_per_class: int = 20, seed: int = 0
) -> Path:
    """Write a CIFAR-10 archive in the real python format with synthetic, learnable images.

    Args:
        out_dir: the dataset root; files go to ``out_dir/cifar-10-batches-py/``.
        train_per_class: training images per class, spread over the five data batches.
        test_per_class: test images per class (``test_batch``).
        seed: the archive is a pure function of the counts and the seed.

    Returns:
        The ``cifar-10-batches-py`` folder.
    """
    if train_per_class <= 0 or test_per_class <= 0:
        raise ValueError(
            f"train_per_class ({train_per_class}) and test_per_class ({test_per_class}) must be positive"
        )
    out = Path(out_dir).expanduser().absolute()
    final = out / CIFAR_DIRNAME
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"{final}: already exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CIFAR_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rng = np.random.default_rng([seed, 99])
        n_cls = len(CIFAR_CLASSES)
        train_labels = rng.permutation(np.repeat(np.arange(n_cls), train_per_class))
        test_labels = rng.permutation(np.repeat(np.arange(n_cls), test_per_class))
        train = _cifar_images(train_labels, [seed, 0])
        test = _cifar_images(test_labels, [seed, 1])
        parts = np.array_split(np.arange(len(train_labels)), 5)
        for b, idx in enumerate(parts, start=1):
            _dump_py2(
                {
                    "batch_label": f"training batch {b} of 5",
                    "labels": [int(x) for x in train_labels[idx]],
                    "data": train[idx],
                    "filenames": [f"synthetic_{seed}_train_{i:06d}.png" for i in idx],
                },
                tmp / f"data_batch_{b}",
            )
        _dump_py2(
            {
                "batch_label": "testing batch 1 of 1",
                "labels": [int(x) for x in test_labels],
                "data": test,
                "filenames": [f"synthetic_{seed}_test_{i:06d}.png" for i in range(len(test_labels))],
            },
            tmp / "test_batch",
        )
        _dump_py2(
            {"label_names": list(CIFAR_CLASSES), "num_cases_per_batch": len(parts[0]), "num_vis": 3072},
            tmp / "batches.meta",
        )
        if final.exists():
            final.rmdir()
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
