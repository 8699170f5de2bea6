"""Whether an image file is one the training decoders take: what names an undecodable file in a
training error, and what ``data verify`` checks every image with (``pipeline.data.prep.verify``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from pipeline.store import locations


def _read_bytes(path: str) -> bytes:
    data = locations.read_bytes(path) if locations.is_uri(path) else Path(path).read_bytes()
    if data is None:
        raise FileNotFoundError(2, "no such object", path)
    return data


def check_image(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """None for a sound RGB (or greyscale) JPEG, else (kind, reason).

    Args:
        path: the file to check (a local path or an ``s3://`` / ``gs://`` URI); it is fully
            decoded, so truncation is found.
    """
    try:
        data = _read_bytes(str(path))
    except OSError as e:
        return "undecodable", f"unreadable ({e.strerror or e})"
    if not data:
        return "empty", "empty file (0 bytes)"
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    # PIL's default (ImageFile.LOAD_TRUNCATED_IMAGES False) makes load() fail on a truncated file.
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            img.load()
    except Exception as e:  # PIL raises many types for bad data; every one means "cannot train on it"
        msg = str(e) or type(e).__name__
        if is_jpeg and ("truncated" in msg or "premature" in msg.lower()):
            return "truncated", f"truncated JPEG ({len(data)} bytes; {msg})"
        if is_jpeg:
            return "undecodable", f"undecodable JPEG ({msg})"
        return "undecodable", f"not an image PIL can decode ({data[:8]!r}...: {msg})"
    if not is_jpeg or fmt != "JPEG":
        kind = "png" if fmt == "PNG" else "not_jpeg"
        return kind, f"{fmt} data in a .JPEG file (mode {mode})"
    if mode == "CMYK":
        return "cmyk", "CMYK JPEG (decoders expect RGB)"
    if mode not in ("RGB", "L"):
        return "not_jpeg", f"JPEG in colour mode {mode} (expected RGB)"
    return None
