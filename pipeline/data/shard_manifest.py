"""The sharded layout's manifest: what training and evaluation read to know a sharded dataset.

    manifest = load_manifest("s3://bucket/imagenet-shards")     # None: not a sharded dataset
    manifest.split("train").offset[i]                           # byte offset of sample i's JPEG
    check_shards(manifest)                                      # every shard there, of its size

``ROOT/manifest.json.gz`` lists every sample's split, shard, byte offset and size of its JPEG
inside that shard, label, CRC-32 and source name; the class list; every shard's size and
SHA-256; the seed, the shard size and the tool's version. Training reads the manifest and
nothing else to know the dataset (``pipeline.data.shard_feed``); the shards' bytes come
through the node's cache (``pipeline.data.shard_cache``). ``data shard`` writes the manifest
and the shards (``pipeline.data.prep.shard_writer``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.layout import DataLayoutError
from pipeline.store import locations

MANIFEST_NAME = "manifest.json.gz"
MANIFEST_FORMAT = "resnet-pipeline/shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


class ShardError(DataLayoutError):
    """A sharded dataset that cannot be used; the message names the shard or file and the fix.

    A ``DataLayoutError``: every command that reports a bad dataset as a message and exit status 2
    before any work (train, eval, the dry run) reports this one the same way."""


def repair_hint(source: str, root: str) -> str:
    return f"re-run `python -m pipeline data shard {source} {root}` to repair it"


@dataclass(frozen=True)
class SplitSamples:
    """One split's samples in manifest order (numpy columns)."""

    shard: np.ndarray  # int32: index into Manifest.shards
    offset: np.ndarray  # int64: byte offset of the JPEG inside the shard
    size: np.ndarray  # int64: its length
    label: np.ndarray  # int64
    crc32: np.ndarray  # uint32 of the JPEG bytes
    name: tuple[str, ...]  # the source image, relative to the source root

    def __len__(self) -> int:
        return len(self.label)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    size: int
    sha256: str
    samples: int


@dataclass(frozen=True)
class Manifest:
    root: str
    classes: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    splits: dict[str, SplitSamples]
    source: str
    seed: int
    digest: str  # SHA-256 of the manifest file: names the dataset in a node's cache

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitSamples:
        return self.splits[name]

    def shard_ids(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.shards) if s.split == split]

    def bytes_of(self, split: str) -> int:
        return sum(s.size for s in self.shards if s.split == split)


def manifest_location(root: str) -> str:
    return locations.join(root, MANIFEST_NAME)


def normal_root(root: str | os.PathLike[str]) -> str:
    """A dataset root as the manifest records it: a URI without its trailing slash, else an absolute path."""
    if locations.is_uri(root):
        return str(root).rstrip("/")
    return str(Path(root).expanduser().absolute())


def load_manifest(root: str | os.PathLike[str]) -> Manifest | None:
    """The manifest at ``ROOT/manifest.json.gz``, or None when ROOT holds none (not a sharded dataset).

    Raises:
        ShardError: a manifest that cannot be read or is not this tool's format.
    """
    root = normal_root(root)
    path = manifest_location(root)
    try:
        raw = locations.read_bytes(path)
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e}); {locations.access_hint(path)}") from None
    if raw is None:
        return None
    try:
        doc = json.loads(gzip.decompress(raw))
        if doc.get("format") != MANIFEST_FORMAT or doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
        shards = tuple(ShardInfo(**s) for s in doc["shards"])
        splits = {
            split: SplitSamples(
                shard=np.asarray(col["shard"], np.int32),
                offset=np.asarray(col["offset"], np.int64),
                size=np.asarray(col["size"], np.int64),
                label=np.asarray(col["label"], np.int64),
                crc32=np.asarray(col["crc32"], np.uint32),
                name=tuple(col["name"]),
            )
            for split, col in doc["splits"].items()
        }
        manifest = Manifest(
            root=root,
            classes=tuple(doc["classes"]),
            shards=shards,
            splits=splits,
            source=doc["source"],
            seed=int(doc["seed"]),
            digest=hashlib.sha256(raw).hexdigest(),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"{path}: not a readable shard manifest ({e}); write it with `python -m pipeline data shard SRC {root}`"
        ) from None
    for split in SPLITS:
        if split not in manifest.splits or not len(manifest.splits[split]):
            raise ShardError(
                f"{path}: no {split} samples; write it again with `python -m pipeline data shard SRC {root}`"
            )
    return manifest


def check_shards(manifest: Manifest) -> None:
    """Every shard the manifest names is in ROOT with its recorded size (one listing of ROOT).

    Checksums are checked where the bytes are read (the node's shard cache), not here.

    Raises:
        ShardError: a shard missing or of another size, naming it and the repair.
    """
    import pyarrow.fs

    fs, path = locations.filesystem(manifest.root)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=False))
    except OSError as e:
        raise ShardError(
            f"{manifest.root}: cannot be listed ({e}); {locations.access_hint(manifest.root)}"
        ) from None
    sizes = {info.base_name: info.size for info in infos if info.type == pyarrow.fs.FileType.File}
    for shard in manifest.shards:
        where = locations.join(manifest.root, shard.name)
        if shard.name not in sizes:
            raise ShardError(
                f"{where}: missing (the manifest lists it); {repair_hint(manifest.source, manifest.root)}"
            )
        if sizes[shard.name] != shard.size:
            raise ShardError(
                f"{where}: {sizes[shard.name]} bytes, the manifest says {shard.size} (truncated or replaced); "
                f"{repair_hint(manifest.source, manifest.root)}"
            )
