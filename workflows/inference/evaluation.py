"""Evaluation on the cluster: a split's images through the predictor actors of batch inference
(each model loaded once per actor, on its GPU where it asks for one, images read and decoded
where they are predicted), their COCO results gathered to the driver, COCOeval run once a model.
The driver never runs a model.

    results = predict_split(split, [candidate, champion], infer, tracking_uri, s3)   # one pass
    metrics = [r.evaluate(split.coco) for r in results]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch

from workflows.config import InferConfig
from workflows.inference.pipeline import ModelActor, actor_options
from workflows.ingest import Split
from workflows.registry import ResolvedModel
from workflows.storage import S3Config
from workflows.training.steps import Predictions, coco_results_of

log = logging.getLogger(__name__)

RESULTS = pa.schema([
    ("image_id", pa.int64()),
    ("model", pa.int32()),  # the index of the model in the actor's list
    ("bbox", pa.string()),  # JSON: the image's COCO bbox results
    ("segm", pa.string()),  # JSON: its segm results (compressed RLE)
    ("node", pa.string()),  # the Ray node that predicted it
    ("error", pa.string()),  # the image could not be read or decoded (null when fine)
])


def split_blocks(split: Split, rows_per_block: int) -> ray.data.Dataset:
    """The split's images as a dataset of path, image_id, height and width, in blocks of
    `rows_per_block` (several blocks: the actors share the work)."""
    records = split.records
    blocks = []
    for i in range(0, len(records), rows_per_block):
        part = records[i:i + rows_per_block]
        blocks.append(pa.table({"path": [r["path"] for r in part], "image_id": [r["image_id"] for r in part],
                                "height": [r["height"] for r in part], "width": [r["width"] for r in part]}))
    return ray.data.from_arrow(blocks)


class Scorer(ModelActor):
    """An evaluation actor: each batch read and decoded once, then predicted by every model it
    holds (promotion's candidate and champion in one pass), into COCO results."""

    def __init__(self, models: list[ResolvedModel], tracking_uri: str, infer: InferConfig, s3: S3Config):
        super().__init__(models, tracking_uri, infer, s3)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        ids = batch.column("image_id").to_pylist()
        sizes = list(zip(batch.column("height").to_pylist(), batch.column("width").to_pylist()))
        rows: dict[str, list] = {name: [] for name in RESULTS.names}
        good, images = [], []
        for image_id, path, size, (image, error) in zip(ids, paths, sizes, self.read(paths)):
            if error is None and image.shape[:2] != size:
                error = (f"{path}: decoded size {image.shape[1]}x{image.shape[0]} differs from the annotation "
                         f"file's {size[1]}x{size[0]}")
            if error is not None:
                self._add(rows, image_id, -1, None, None, error)
                continue
            good.append(image_id)
            images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255)
        for index, loaded in enumerate(self.loaded):
            if not images:
                break
            results, _ = coco_results_of(loaded.model, images, good, loaded.labels, self.device)
            by_image: dict[int, tuple[list, list]] = {i: ([], []) for i in good}
            for b in results.bbox:
                by_image[b["image_id"]][0].append(b)
            for s in results.segm:
                by_image[s["image_id"]][1].append(s)
            for image_id in good:
                bbox, segm = by_image[image_id]
                self._add(rows, image_id, index, json.dumps(bbox), json.dumps(segm), None)
        return pa.Table.from_pydict(rows, schema=RESULTS)

    def _add(self, rows: dict[str, list], image_id: int, model: int, bbox: str | None, segm: str | None,
             error: str | None) -> None:
        for name, value in zip(RESULTS.names, (image_id, model, bbox, segm, self.node, error)):
            rows[name].append(value)


@dataclass
class SplitPredictions:
    """What the actors made of a split: each model's COCO results, the images that could not be
    used, and the nodes whose actors predicted."""

    results: list[Predictions]
    errors: list[str] = field(default_factory=list)
    nodes: set[str] = field(default_factory=set)


def scored(split: Split, models: list[ResolvedModel], infer: InferConfig, tracking_uri: str,
           s3: S3Config) -> ray.data.Dataset:
    """The (lazy) dataset of every image of `split` predicted by every model on the predictor
    actors (`infer.*`: concurrency, num_gpus, cpus_per_actor, batch_size, threads), in RESULTS."""
    ds = split_blocks(split, rows_per_block=infer.batch_size).map_batches(
        Scorer, batch_format="pyarrow", **actor_options(infer),
        fn_constructor_kwargs={"models": models, "tracking_uri": tracking_uri, "infer": infer, "s3": s3})
    # Every actor loaded before the first batch is dealt: the first ready would otherwise take
    # the whole of a small split while the others load their models.
    ds.context.wait_for_min_actors_s = 1800
    return ds


def predict_split(split: Split, models: list[ResolvedModel], infer: InferConfig, tracking_uri: str,
                  s3: S3Config) -> SplitPredictions:
    """`scored`, its results brought back to the driver. An image that cannot be read or decoded
    is left out of the evaluation with a warning naming it, as training's evaluation leaves it
    out."""
    out = SplitPredictions([Predictions() for _ in models])
    for batch in scored(split, models, infer, tracking_uri, s3).iter_batches(batch_format="pyarrow",
                                                                             batch_size=None):
        for row in batch.to_pylist():
            out.nodes.add(row["node"])
            if row["error"] is not None:
                out.errors.append(row["error"])
                continue
            target = out.results[row["model"]]
            target.bbox += json.loads(row["bbox"])
            target.segm += json.loads(row["segm"])
            target.image_ids.append(row["image_id"])
    for error in out.errors[:5]:
        log.warning("left out of the evaluation: %s", error)
    return out
