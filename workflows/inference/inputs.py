"""Batch inference inputs: the image store listed into one Arrow array, and the output folder's
rows already written (a rerun segments only what is missing)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from workflows.storage import S3Config, exists, filesystem, is_s3, list_files

log = logging.getLogger(__name__)

RLE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("width", pa.int32()),  # as displayed (after EXIF orientation)
    ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # x1, y1, x2, y2 pixels
    ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int64())),  # the dataset's category ids
    ("category_names", pa.list_(pa.string())),
    ("masks", pa.list_(RLE)),  # COCO compressed RLE
    ("model", pa.string()),  # the model URI loaded (an alias pinned: models:/NAME/VERSION) or its path
    ("model_version", pa.string()),  # the registry version (null for a model outside the registry)
    ("error", pa.string()),  # null when fine
])
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


def list_inputs(src: str, extensions: list[str], s3: S3Config) -> pa.Array:
    """The input URIs of `src` (infer.input) as one Arrow string array (compact: no Python object
    per path). A folder or prefix is walked recursively and filtered by `extensions`
    (case-insensitive); a manifest gives its `path` column."""
    if input_kind(src, s3) == "manifest":
        return read_manifest(src, s3)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    paths = pa.array(list_files(src, s3, suffixes=exts), pa.string())
    if len(paths) == 0:
        raise FileNotFoundError(f"infer.input: no files ending in {', '.join(exts)} under {src} "
                                "(set infer.extensions to the ones the store holds)")
    return paths


def input_kind(src: str, s3: S3Config) -> str:
    """"folder" or "manifest"; raises naming infer.input when it does not exist."""
    kind = exists(src, s3)
    if kind is None:
        raise FileNotFoundError(f"infer.input: {src} does not exist")
    return "manifest" if kind == "file" else "folder"


def read_manifest(uri: str, s3: S3Config) -> pa.Array:
    """A .txt (one path a line), .csv or .parquet (a `path` column) manifest of local paths or
    s3:// URIs; relative local paths are relative to the manifest's folder."""
    if not uri.lower().endswith(MANIFEST_SUFFIXES):
        raise ValueError(f"infer.input: {uri} is a file but not a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    fs, path = filesystem(uri, s3)
    kind = uri.lower().rsplit(".", 1)[1]
    if kind == "txt":
        with fs.open_input_stream(path) as f:
            column = pa.array(f.read().decode("utf-8").splitlines(), pa.string())
    else:
        with fs.open_input_file(path) as f:
            table = pacsv.read_csv(f) if kind == "csv" else pq.read_table(f)
        if "path" not in table.column_names:
            raise ValueError(f"infer.input: manifest {uri} has no `path` column (columns: {table.column_names})")
        column = table.column("path").combine_chunks().cast(pa.string())
    base = str(Path(uri).resolve().parent)
    out = []
    for p in column.to_pylist():
        p = (p or "").strip()
        if p and not is_s3(p):
            p = os.path.normpath(os.path.join(base, p))  # absolute paths stay as they are
        if p:
            out.append(p)
    return pa.array(out, pa.string())


def output_files(output: str, s3: S3Config) -> list[str]:
    """The Parquet files of the output folder, as paths inside its filesystem."""
    return [filesystem(f, s3)[1] for f in list_files(output, s3, recursive=False, suffixes=(".parquet",))]


def prepare_output(output: str, s3: S3Config, retry_errors: bool) -> pa.Array:
    """Make the output folder consistent and return the paths already done.

    A file that cannot be read (a write cut short by a crash) is removed: its rows were never
    complete and are redone. With `retry_errors`, rows holding an error are removed from their
    files (each rewritten whole, then swapped in), so those inputs are tried again.
    """
    fs, root = filesystem(output, s3)
    fs.create_dir(root, recursive=True)
    done = []
    for f in output_files(output, s3):
        try:
            table = pq.read_table(f, filesystem=fs, columns=["path", "error"])
        except (pa.ArrowInvalid, OSError) as e:
            log.warning("removing %s: unreadable (%s); its rows are redone", f, e)
            fs.delete_file(f)
            continue
        if retry_errors and table.column("error").null_count < len(table):
            full = pq.read_table(f, filesystem=fs, schema=SCHEMA)
            keep = full.filter(pc.is_null(full.column("error")))
            tmp = f + ".tmp"
            pq.write_table(keep, tmp, filesystem=fs)
            fs.move(tmp, f)
            table = keep.select(["path", "error"])
        done.append(table.column("path").combine_chunks())
    return pa.concat_arrays(done) if done else pa.array([], pa.string())


