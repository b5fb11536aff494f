"""Local paths and s3:// URIs through pyarrow's filesystems."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(root: str, path: str) -> str:
    """`path` if absolute (or a URI), else `root`/`path`. Local results are absolute."""
    if not path:
        out = root
    elif is_s3(path) or Path(path).is_absolute():
        return path
    else:
        out = posixpath.join(root, path) if is_s3(root) else str(Path(root) / path)
    return out if is_s3(out) else str(Path(out).resolve())


def filesystem(uri: str, s3: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
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
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]


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


def list_files(uri: str, s3: dict[str, Any] | None = None) -> set[str]:
    """All file paths under a folder / prefix, as full URIs (one listing, not one call a file)."""
    fs, path = filesystem(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = "s3://" if is_s3(uri) else ""
    return {prefix + i.path for i in infos if i.type == pafs.FileType.File}
