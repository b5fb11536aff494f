"""Local paths and s3:// URIs through pyarrow's filesystems: the one way the jobs read, write
and list files, wherever `data.root`, `output_dir` and infer's input and output live."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow.fs as pafs


@dataclass
class S3Config:
    """pyarrow S3 settings for every s3:// URI of a job (data, output_dir, infer's input and
    output); a key left unset comes from the AWS environment / files, as for the AWS CLI."""

    endpoint_override: Optional[str] = None
    region: Optional[str] = None
    access_key: Optional[str] = None
    secret_key: Optional[str] = None
    anonymous: bool = False


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


def s3_options(s3: S3Config | None) -> dict[str, Any]:
    """pyarrow S3FileSystem arguments from the `data.s3` settings; an unset key falls back to the
    AWS environment as the AWS CLI reads it (`AWS_ENDPOINT_URL(_S3)`, `AWS_REGION` /
    `AWS_DEFAULT_REGION`; credentials from `AWS_ACCESS_KEY_ID`... or the AWS files)."""
    s3 = s3 or S3Config()
    env = os.environ
    kwargs: dict[str, Any] = {
        "region": s3.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = s3.endpoint_override or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if s3.anonymous:
        kwargs["anonymous"] = True
    if s3.access_key:
        kwargs["access_key"], kwargs["secret_key"] = s3.access_key, s3.secret_key
    return kwargs


# One filesystem per process and settings, not one per file: an S3 client is costly to build.
_CACHE: dict[str, pafs.FileSystem] = {}


def filesystem(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    kwargs = s3_options(s3)
    key = json.dumps(kwargs, sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = pafs.S3FileSystem(**kwargs)
    return _CACHE[key], uri[len("s3://"):]


def ray_storage(uri: str, s3: S3Config | None = None) -> tuple[str, pafs.FileSystem | None]:
    """`storage_path` and `storage_filesystem` for Ray Train's and Tune's RunConfig: a local
    folder as it is; an s3:// URI as its path inside the S3 filesystem of the job's settings."""
    if not is_s3(uri):
        return absolute(uri), None
    fs, path = filesystem(uri, s3)
    return path, fs


def to_uri(fs_path: str, like: str) -> str:
    """A path inside the filesystem of `like` back to a path or URI a user would write."""
    return f"s3://{fs_path}" if is_s3(like) else fs_path


def fs_uri(fs: pafs.FileSystem, path: str) -> str:
    """A path inside a pyarrow filesystem (as Ray Train reports its checkpoints) as a path or
    URI a user would write."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
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


def list_files(uri: str, s3: S3Config | None = None, recursive: bool = True,
               suffixes: tuple[str, ...] = ()) -> list[str]:
    """The files under a folder or prefix as full paths or URIs, sorted, in one listing (not one
    call a file); with `suffixes`, only names ending in one of them (case-insensitive). A
    folder that does not exist holds none."""
    fs, path = filesystem(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(to_uri(i.path, uri) for i in infos if i.type == pafs.FileType.File
                  and (not suffixes or i.path.lower().endswith(suffixes)))


def exists(uri: str, s3: S3Config | None = None) -> str | None:
    """"file", "folder", or None when nothing is there."""
    fs, path = filesystem(uri, s3)
    kind = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}.get(kind)


def write_bytes(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    fs, path = filesystem(uri, s3)
    with whole_file(fs, path) as f:
        f.write(data)


@contextlib.contextmanager
def whole_file(fs: pafs.FileSystem, path: str) -> Iterator[Any]:
    """A stream that writes `path` on `fs` whole or not at all. A local file is written beside it
    and renamed; an object appears only when its upload completes, so a writer killed part-way
    leaves none; a write that fails part-way removes what it wrote."""
    local = fs.type_name == "local"
    target = f"{path}.part" if local else path
    if local:
        fs.create_dir(posixpath.dirname(path), recursive=True)
    try:
        with fs.open_output_stream(target) as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(target)
        raise
    if local:
        fs.move(target, path)


def remove(uri: str, s3: S3Config | None = None) -> None:
    fs, path = filesystem(uri, s3)
    fs.delete_file(path)


def check_writable(uri: str, key: str, s3: S3Config | None = None) -> None:
    """Write 4 KiB to a new file under `uri` (a folder or prefix) and delete it, or raise naming
    the key: checkpoints go there, and a full disk or a bucket without write access should stop
    the job before any work."""
    try:
        if is_s3(uri):
            probe = join(uri, f".write-check-{secrets.token_hex(4)}")
            write_bytes(probe, b"\0" * 4096, s3)
            remove(probe, s3)
        else:
            Path(uri).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=uri, prefix=".write-check-") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())  # a full disk fails here, not at the first checkpoint
    except OSError as e:
        where = "the bucket's credentials and endpoint (AWS_* or data.s3)" if is_s3(uri) else "free space there"
        raise OSError(f"{key}={uri} is not writable ({e.strerror or str(e).splitlines()[0][:300]}); check {where} or "
                      f"point {key} at another folder") from None


@contextlib.contextmanager
def local_file(uri: str, s3: S3Config | None = None) -> Iterator[str]:
    """A local path to read `uri` from: a local file as it is, an object downloaded to a
    temporary file (removed on leaving)."""
    if not is_s3(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="mrcnn-") as tmp:
        fs, path = filesystem(uri, s3)
        local = os.path.join(tmp, posixpath.basename(path))
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield local


def upload_folder(folder: str | os.PathLike, uri: str, s3: S3Config | None = None) -> None:
    """Copy a local folder's files to `uri` (a folder or prefix)."""
    fs, path = filesystem(uri, s3)
    pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
