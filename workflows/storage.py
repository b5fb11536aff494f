"""Local paths and s3:// URIs through pyarrow's filesystems: the one way the jobs read bytes and
list files."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is."""
    return path if is_s3(path) else str(Path(path).resolve())


def join(root: str, path: str) -> str:
    """`path` if absolute (or a URI), else `root`/`path`. Local results are absolute."""
    if not path:
        out = root
    elif is_s3(path) or Path(path).is_absolute():
        return path
    else:
        out = posixpath.join(root, path) if is_s3(root) else str(Path(root) / path)
    return absolute(out)


def s3_filesystem(s3: dict[str, Any] | None) -> pafs.S3FileSystem:
    """pyarrow's S3 client from the `data.s3` settings; unset keys fall back to the AWS
    environment and files, as for the AWS CLI."""
    s3 = s3 or {}
    kwargs: dict[str, Any] = {"region": s3.get("region") or "us-east-1"}
    if s3.get("endpoint_override"):
        endpoint = s3["endpoint_override"]
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if s3.get("anonymous"):
        kwargs["anonymous"] = True
    if s3.get("access_key"):
        kwargs["access_key"], kwargs["secret_key"] = s3["access_key"], s3.get("secret_key")
    return pafs.S3FileSystem(**kwargs)


# One filesystem per process and settings, not one per file: an S3 client is costly to build.
_CACHE: dict[str, pafs.FileSystem] = {}


def filesystem(uri: str, s3: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    key = json.dumps(s3 or {}, sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = s3_filesystem(s3)
    return _CACHE[key], uri[len("s3://"):]


def to_uri(fs_path: str, like: str) -> str:
    """A path inside the filesystem of `like` back to a path or URI a user would write."""
    return f"s3://{fs_path}" if is_s3(like) else fs_path


def read_bytes(uri: str, s3: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, s3)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} does not exist") from e
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(f"{uri} does not exist") from e
        raise


def list_files(uri: str, s3: dict[str, Any] | None = None, recursive: bool = True,
               suffixes: tuple[str, ...] = ()) -> list[str]:
    """The files under a folder or prefix as full paths or URIs, sorted, in one listing (not one
    call a file); with `suffixes`, only names ending in one of them (case-insensitive). A
    folder that does not exist holds none."""
    fs, path = filesystem(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(to_uri(i.path, uri) for i in infos if i.type == pafs.FileType.File
                  and (not suffixes or i.path.lower().endswith(suffixes)))


def exists(uri: str, s3: dict[str, Any] | None = None) -> str | None:
    """"file", "folder", or None when nothing is there."""
    fs, path = filesystem(uri, s3)
    kind = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}.get(kind)


def write_bytes(uri: str, data: bytes, s3: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, s3)
    if not is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
