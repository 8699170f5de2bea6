"""W&B offline runs on disk: read a ``.wandb`` file back, record by record.

    for row in read_wandb_history("runs/demo/wandb/offline-run-.../run-abc123.wandb"): ...

wandb ships the protobuf definitions but, since its Go core took over, no Python reader of its
transaction log. Reading it back is how the tests check what a run logged, and how a run's
offline segments (one per restart of rank 0) are put together before they are synced.
"""

from __future__ import annotations

import pathlib
import struct
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

# wandb's transaction log is LevelDB's log format: a 7-byte file header (":W&B", magic 0xBEE1,
# version 0), then 32 KiB blocks of records, each with a 7-byte header (CRC-32 of type byte +
# payload, little-endian length, type); a record that does not fit a block is split into
# FIRST/MIDDLE/LAST pieces, and a block tail shorter than a header is zero padding.
_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: str | pathlib.Path) -> Iterator[Record]:
    """Yield the protobuf ``Record`` messages of a ``.wandb`` file, in order.

    A truncated tail (a run still writing, or killed) ends the iteration quietly.

    Args:
        path: a ``run-<id>.wandb`` file.

    Raises:
        ValueError: the file is not a wandb log or a record fails its checksum.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = pathlib.Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short to be a .wandb file")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a .wandb file (header {data[:7]!r})")
    pos, pending = _FILE_HEADER.size, None
    while pos < len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER.size:
            pos += left_in_block
            continue
        if pos + _RECORD_HEADER.size > len(data):
            return
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        payload = data[start : start + length]
        if kind == 0 and length == 0:  # zero-filled (preallocated) tail
            return
        if len(payload) < length:
            return
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: record at byte {pos} fails its checksum")
        pos = start + length
        if kind == _FULL:
            pending = payload
        elif kind == _FIRST:
            pending = bytearray(payload)
            continue
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += payload
            if kind == _MIDDLE:
                continue
        else:
            raise ValueError(f"{path}: unexpected record type {kind} at byte {pos}")
        record = Record()
        record.ParseFromString(bytes(pending))
        pending = None
        yield record


def _history_value(item: Any) -> Any:
    import json

    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def read_wandb_history(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The history rows logged to a ``.wandb`` file, as dicts (with ``_step`` and ``_runtime``).

    Args:
        path: a ``run-<id>.wandb`` file.
    """
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = _history_value(item)
        rows.append(row)
    return rows
