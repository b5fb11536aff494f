"""The batch inference pipeline on Ray Data, streaming: paths -> read + decode (CPU tasks) ->
predict + RLE-encode (an actor pool, the model loaded once per actor) -> Parquet files. A file
that cannot be read or decoded becomes a row with `error` set; the job goes on."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from mrcnn.data.images import ImageDecodeError, decode_image
from mrcnn.segment import ROW_FIELDS, error_row, segment_images
from workflows.allocator import reuse_large_blocks
from workflows.engine import set_detection_limits
from workflows.inference.inputs import SCHEMA
from workflows.registry import load_model
from workflows.storage import read_bytes


def path_blocks(paths: pa.Array, infer: dict[str, Any]) -> ray.data.Dataset:
    """A dataset of `path` in blocks of `infer.rows_per_file`: work streams through the stages and
    reaches the disk as it goes (one block of the whole listing would be written at the end)."""
    n = infer["rows_per_file"]
    return ray.data.from_arrow([pa.table({"path": paths.slice(i, n)}) for i in range(0, len(paths), n)])


def decode_batch(batch: pa.Table, s3: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Read and decode each image; a failure becomes an `error` message for that row only.
    The column holds "" when fine: a batch of only nulls would change its type downstream."""
    out: dict[str, list] = {"path": [], "image": [], "error": []}
    for path in batch.column("path").to_pylist():
        try:
            image, error = decode_image(read_bytes(path, s3), path, max_pixels=max_pixels), ""
        except (ImageDecodeError, OSError, ValueError) as e:
            image, error = np.zeros((0, 0, 3), np.uint8), str(e) or type(e).__name__
        out["path"].append(path)
        out["image"].append(image)
        out["error"].append(error)
    return {"path": np.array(out["path"], dtype=object), "image": out["image"],
            "error": np.array(out["error"], dtype=object)}


class Predictor:
    """One per actor: the model is loaded once, then each batch is predicted in one call and its
    masks RLE-encoded here, so dense masks never leave the actor."""

    def __init__(self, model_uri: str, tracking_uri: str, version: str, infer: dict[str, Any]):
        if infer["torch_threads"]:
            torch.set_num_threads(infer["torch_threads"])
        reuse_large_blocks()
        loaded = load_model(model_uri, tracking_uri)
        self.device = torch.device("cuda" if infer["num_gpus"] > 0 and torch.cuda.is_available() else "cpu")
        self.model = set_detection_limits(loaded.model, infer["score_threshold"], infer["max_detections"])
        self.model.eval().to(self.device)
        self.labels = loaded.labels
        self.uri, self.version = model_uri, version

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        errors = [str(e) or None for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if e is None]
        rows = [error_row(e) if e else None for e in errors]
        for i, row in zip(good, segment_images(self.model, [batch["image"][i] for i in good], self.labels,
                                               self.device)):
            rows[i] = row
        columns = {name: [row[name] for row in rows] for name in ROW_FIELDS}
        return pa.Table.from_pydict({"path": list(batch["path"]), **columns, "model": [self.uri] * len(rows),
                                     "model_version": [self.version] * len(rows)}, schema=SCHEMA)


def write_rows(ds: ray.data.Dataset, infer: dict[str, Any], s3: dict[str, Any], model_uri: str, tracking_uri: str,
               version: str, fs: pafs.FileSystem, out_path: str) -> None:
    """decode (CPU tasks) -> predict (actor pool) -> Parquet files under `out_path`."""
    # The light stages ask for a fraction of a CPU: with whole CPUs they would wait behind the
    # predictors on a small machine, and rows would reach the disk only at the end.
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=infer["batch_size"],
                        compute=ray.data.TaskPoolStrategy(size=infer["decode_concurrency"]),
                        num_cpus=0.5,  # light work; differing resources keep it out of the actors
                        fn_kwargs={"s3": s3, "max_pixels": infer["max_pixels"]})
    ds = ds.map_batches(Predictor, batch_size=infer["batch_size"], batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=infer["concurrency"]),
                        num_gpus=infer["num_gpus"], num_cpus=infer["cpus_per_actor"],
                        fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri, "version": version,
                                               "infer": infer})
    ds.write_parquet(out_path, filesystem=fs, schema=SCHEMA, min_rows_per_file=infer["rows_per_file"],
                     ray_remote_args={"num_cpus": 0.25})


