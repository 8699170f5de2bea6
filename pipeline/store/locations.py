"""Locations that may be URIs (``s3://bucket/imagenet``, ``gs://...``) or local paths: datasets, runs.

    fs, path = filesystem("s3://bucket/imagenet")       # pyarrow, as Ray Train itself opens storage
    dirs, files = list_dir("s3://bucket/imagenet/train")
    data = read_bytes("s3://bucket/imagenet/pipeline-index.json.gz")   # None when absent

Every client is built with ``pyarrow.fs.FileSystem.from_uri``, which follows the standard AWS
environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, credentials,
profiles); a hand-built ``S3FileSystem()`` would ignore the endpoint, and an S3-compatible
store (MinIO, Ceph, a local test server) would then be missed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def is_uri(location: str | os.PathLike[str]) -> bool:
    """A remote location (``s3://``, ``gs://``, ``file://``...) rather than a local path."""
    return "://" in str(location)


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a URI (always ``/``) or a local path."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return os.path.join(location, *parts)


def filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().absolute())


def access_hint(location: str) -> str:
    """What to check when an object store cannot be reached (appended to error messages)."""
    if location.startswith("s3://"):
        return (
            "check the bucket name, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), "
            "AWS_REGION, and AWS_ENDPOINT_URL for an S3-compatible store"
        )
    if location.startswith("gs://"):
        return "check the bucket name and the credentials (GOOGLE_APPLICATION_CREDENTIALS)"
    return "check the path"


def kind(location: str) -> str:
    """``"dir"``, ``"file"`` or ``"missing"``; a prefix holding objects counts as a folder."""
    import pyarrow.fs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.Directory:
        return "dir"
    if info.type == pyarrow.fs.FileType.File:
        return "file"
    return "missing"


def list_dir(location: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) directly under ``location``, each sorted.

    On S3 this is one delimited listing (a page per 1,000 entries): the class folders of an
    ImageNet split cost one request, not a walk of every object.
    """
    import pyarrow.fs

    fs, path = filesystem(location)
    dirs, files = [], []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=False)):
        if info.type == pyarrow.fs.FileType.Directory:
            dirs.append(info.base_name)
        elif info.type == pyarrow.fs.FileType.File:
            files.append(info.base_name)
    return sorted(dirs), sorted(files)


def list_tree(location: str) -> list[tuple[str, bool]]:
    """Every entry under ``location`` as (path relative to it with ``/``, is a folder), any order.

    One recursive listing: for an object store that is a walk of the object keys, with no
    request per folder.
    """
    import pyarrow.fs

    fs, path = filesystem(location)
    base = path.rstrip("/") + "/"
    out = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=False)):
        if info.type in (pyarrow.fs.FileType.Directory, pyarrow.fs.FileType.File) and info.path.startswith(
            base
        ):
            out.append((info.path[len(base) :], info.type == pyarrow.fs.FileType.Directory))
    return out


def read_bytes(location: str) -> bytes | None:
    """The whole file or object, or None when there is none."""
    if not is_uri(location):  # a local file needs no pyarrow (the GPU check runs without it)
        local = Path(location).expanduser()
        return local.read_bytes() if local.is_file() else None
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path, compression=None) as f:  # no guessing from ".gz"
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Replace ``location`` as a whole: readers see the old or the new content, never a mix.

    An object store's PUT is atomic already; a local file is written beside and renamed.
    """
    if is_uri(location):
        fs, path = filesystem(location)
        if fs.type_name == "local":  # file://: the folder must exist (object stores have none)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
        return
    target = Path(location).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_folder_to(local: Path, location: str) -> None:
    """Copy a local folder's files to a URI (replacing what is there): W&B's offline run, a checkpoint."""
    import pyarrow.fs

    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def remove_tree(location: str) -> None:
    """Delete a folder and everything under it, local or in object storage; absent is fine."""
    import shutil

    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
