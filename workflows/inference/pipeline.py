"""The batch inference pipeline on Ray Data, streaming: paths -> read + decode + predict +
RLE-encode (an actor pool, the model loaded once per actor) -> Parquet files. A file that cannot
be read or decoded becomes a row with `error` set; the job goes on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from mrcnn.segment import ROW_FIELDS, decode_or_error, segment_decoded
from workflows.config import InferConfig
from workflows.inference.inputs import SCHEMA
from workflows.logged_model import load_model
from workflows.registry import ResolvedModel
from workflows.runtime.allocator import reuse_large_blocks
from workflows.storage import S3Config, read_bytes


def path_blocks(paths: pa.Array, rows_per_block: int) -> ray.data.Dataset:
    """A dataset of `path` in blocks of `rows_per_block` (infer.rows_per_file): work streams
    through the stages and reaches the disk as it goes (one block of the whole listing would be
    written at the end)."""
    n = rows_per_block
    return ray.data.from_arrow([pa.table({"path": paths.slice(i, n)}) for i in range(0, len(paths), n)])


def read_and_decode(paths: list[str], s3: S3Config, max_pixels: int, pool: ThreadPoolExecutor | None
                    ) -> list[tuple[np.ndarray | None, str | None]]:
    """(image, None) or (None, error message) for each path: a file that cannot be read or
    decoded fails alone."""
    def one(path: str) -> tuple[np.ndarray | None, str | None]:
        try:
            data = read_bytes(path, s3)
        except OSError as e:
            return None, str(e) or type(e).__name__
        return decode_or_error(data, path, max_pixels)

    return list(pool.map(one, paths)) if pool else [one(p) for p in paths]


def actor_options(infer: InferConfig) -> dict[str, Any]:
    """`map_batches` arguments of a pool of predictor actors (batch inference and evaluation
    alike): `infer.concurrency` actors of `infer.num_gpus` GPUs and `infer.cpus_per_actor` CPUs
    each (spread over the cluster's nodes: Ray Data's default scheduling strategy, SPREAD)."""
    return {"batch_size": infer.batch_size, "compute": ray.data.ActorPoolStrategy(size=infer.concurrency),
            "num_gpus": infer.num_gpus, "num_cpus": infer.cpus_per_actor}


class ModelActor:
    """What a predictor actor holds: its models, loaded once, on its device (a GPU when it was
    given one), and threads that read and decode the next images. Only paths come in and results
    go out: decoded images never pass through Ray's object store, whose pages a reader keeps
    mapped (its resident memory grew by one image per image when another stage decoded)."""

    def __init__(self, models: list[ResolvedModel], tracking_uri: str, infer: InferConfig, s3: S3Config):
        if infer.torch_threads:
            torch.set_num_threads(infer.torch_threads)
        reuse_large_blocks()
        self.device = torch.device("cuda" if infer.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.loaded = [load_model(m.uri, tracking_uri) for m in models]
        for loaded in self.loaded:
            loaded.model.set_precision(infer.precision).eval().to(self.device)
        self.s3, self.max_pixels = s3, infer.max_pixels
        # Reading and decoding release the GIL: threads overlap them (object-store latency,
        # large JPEGs feeding a GPU).
        self.pool = ThreadPoolExecutor(infer.decode_threads) if infer.decode_threads > 1 else None

    def read(self, paths: list[str]) -> list[tuple[np.ndarray | None, str | None]]:
        return read_and_decode(paths, self.s3, self.max_pixels, self.pool)


class Predictor(ModelActor):
    """Batch inference: each batch of paths read, decoded, predicted in one call and its masks
    RLE-encoded into rows (`inputs.SCHEMA`)."""

    def __init__(self, model: ResolvedModel, tracking_uri: str, infer: InferConfig, s3: S3Config):
        super().__init__([model], tracking_uri, infer, s3)
        self.model = self.loaded[0].model.set_detection_limits(infer.score_threshold, infer.max_detections)
        self.labels = self.loaded[0].labels
        # The `model` column holds the URI loaded (an alias pinned to its version), `model_version`
        # the registry version (null for a model outside the registry).
        self.uri, self.version = model.uri, model.version

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        rows = segment_decoded(self.model, self.read(paths), self.labels, self.device)
        columns = {name: [row[name] for row in rows] for name in ROW_FIELDS}
        return pa.Table.from_pydict({"path": paths, **columns, "model": [self.uri] * len(rows),
                                     "model_version": [self.version] * len(rows)}, schema=SCHEMA)


def write_rows(ds: ray.data.Dataset, infer: InferConfig, model: ResolvedModel, tracking_uri: str, s3: S3Config,
               fs: pafs.FileSystem, out_path: str) -> None:
    """read + decode + predict (actor pool) -> Parquet files under `out_path`."""
    ds = ds.map_batches(Predictor, batch_format="pyarrow", **actor_options(infer),
                        fn_constructor_kwargs={"model": model, "tracking_uri": tracking_uri, "infer": infer, "s3": s3})
    # A fraction of a CPU: with a whole one the writes would wait behind the predictors on a
    # small machine, and rows would reach the disk only at the end.
    ds.write_parquet(out_path, filesystem=fs, schema=SCHEMA, min_rows_per_file=infer.rows_per_file,
                     ray_remote_args={"num_cpus": 0.25})
