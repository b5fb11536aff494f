"""Ray Data ingestion of COCO-format datasets, local or s3://, streaming.

Driver: the annotation file is read once into records (mrcnn.data.coco). Ray Data: records ->
`map_batches(decode_batch)` reads the image bytes through pyarrow, decodes, augments, and emits
rows `{image_id, file_name, image: uint8[3, H, W], target: JSON(annotations with RLE masks)}`.
Masks travel as RLE; they are decoded inside the model, on the training worker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.train import DataConfig as RayDataConfig

from mrcnn.data.coco import CategoryMap, ValidationReport, load_coco_records
from mrcnn.data.images import ImageDecodeError, decode_image
from mrcnn.data.shapes import write_shapes_dataset
from mrcnn.data.transforms import horizontal_flip, resize_shorter_side, to_model_inputs
from workflows.config import AugmentConfig, DataConfig
from workflows.runtime.ray_internals import ExecutionCallback, execution_options, operator_progress
from workflows.storage import S3Config, exists, is_s3, join, list_files, read_bytes, upload_folder, write_bytes

log = logging.getLogger(__name__)


@dataclass
class Split:
    name: str
    records: list[dict[str, Any]]
    categories: CategoryMap
    report: ValidationReport
    coco: dict[str, Any]  # the parsed annotation file: the ground truth for COCOeval


def ensure_shapes(data: DataConfig, root: str) -> None:
    """Generate the synthetic dataset at `root` (`data.root`, absolute) if `data.generate` is
    set and it is not complete. In object storage it is written locally, uploaded, and marked
    complete last."""
    gen, s3 = data.generate, data.s3
    if not gen or exists(join(root, ".complete"), s3) == "file":
        return
    log.info("generating the shapes dataset at %s (%s)", root, gen)
    if not is_s3(root):
        write_shapes_dataset(root, gen.train, gen.val, gen.size, gen.seed)
        return
    with tempfile.TemporaryDirectory(prefix="mrcnn-shapes-") as tmp:
        marker = write_shapes_dataset(tmp, gen.train, gen.val, gen.size, gen.seed) / ".complete"
        done = marker.read_bytes()
        marker.unlink()
        upload_folder(tmp, root, s3)
        write_bytes(join(root, ".complete"), done, s3)


def annotations_uri(data: DataConfig, root: str, split: str) -> str:
    """Where `data.<split>_annotations` is, under `root` (`data.root`, absolute) unless absolute."""
    return join(root, getattr(data, f"{split}_annotations"))


def load_split(data: DataConfig, root: str, split: str, categories: CategoryMap | None = None) -> Split:
    """Read and validate `data.<split>_annotations` under `root` (`data.root`, absolute); each
    record gains `path`, its image URI."""
    s3 = data.s3
    ann_uri = annotations_uri(data, root, split)
    images_root = join(root, getattr(data, f"{split}_images"))
    try:
        coco = json.loads(read_bytes(ann_uri, s3))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"data.{split}_annotations: {ann_uri} does not exist (data.root={root!r})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"data.{split}_annotations: {ann_uri} is not valid JSON: {e}") from e
    if is_s3(images_root):
        present = set(list_files(images_root, s3))
        exists = lambda f: join(images_root, f) in present  # noqa: E731
    else:
        exists = lambda f: os.path.isfile(join(images_root, f))  # noqa: E731
    records, cats, report = load_coco_records(
        coco, image_exists=exists, missing_images=data.missing_images, categories=categories)
    report.source = ann_uri
    for r in records:
        r["path"] = join(images_root, r["file_name"])
    if report.counts:
        log.warning("%s", report)
    return Split(split, records, cats, report, coco)


def records_dataset(records: list[dict[str, Any]]) -> ray.data.Dataset:
    rows = [{"image_id": r["image_id"], "path": r["path"], "file_name": r["file_name"],
             "height": r["height"], "width": r["width"], "annotations": json.dumps(r["annotations"])}
            for r in records]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))


def decode_batch(batch: dict[str, np.ndarray], s3: S3Config, train: bool, augment: AugmentConfig) -> dict[str, Any]:
    """Read, decode and augment a batch of records. An unreadable image is dropped with a
    warning naming it; the epoch goes on."""
    out: dict[str, list] = {k: [] for k in ("image_id", "file_name", "image", "target")}
    for i in range(len(batch["image_id"])):
        path = str(batch["path"][i])
        try:
            image = decode_image(read_bytes(path, s3), path)
        except (ImageDecodeError, OSError) as e:
            log.warning("skipping image: %s", e)
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        if image.shape[:2] != (h, w):
            log.warning("skipping image %s: decoded size %sx%s differs from the annotation file's "
                        "%sx%s", path, image.shape[1], image.shape[0], w, h)
            continue
        anns = json.loads(batch["annotations"][i])
        if train:
            if random.random() < augment.hflip_prob:
                image, anns = horizontal_flip(image, anns)
            if augment.scales:
                size = random.choice(list(augment.scales))
                image, anns = resize_shorter_side(image, anns, size, augment.max_size)
        out["image_id"].append(int(batch["image_id"][i]))
        out["file_name"].append(str(batch["file_name"][i]))
        out["image"].append(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["target"].append(json.dumps(anns))
    return {
        "image_id": np.array(out["image_id"], dtype=np.int64),
        "file_name": np.array(out["file_name"], dtype=object),
        "image": out["image"],
        "target": np.array(out["target"], dtype=object),
    }


def image_dataset(split: Split, data: DataConfig, train: bool) -> ray.data.Dataset:
    """The streaming dataset of decoded (and, for training, augmented) images of a split."""
    ds = records_dataset(split.records)
    if train:
        ds = ds.randomize_block_order()  # cheap per-epoch reshuffle; workers add a local buffer
    return ds.map_batches(
        decode_batch, batch_size=data.decode_batch_size,
        compute=ray.data.TaskPoolStrategy(size=data.decode_concurrency),
        fn_kwargs={"s3": data.s3, "train": train, "augment": data.augment},
    )


def batch_to_model_inputs(batch: dict[str, Any]) -> tuple[list, list[dict], list[int]]:
    """A numpy batch from `iter_batches` -> (float images, targets with RLE masks, image ids)."""
    images, targets = [], []
    for image, target in zip(batch["image"], batch["target"]):
        im, t = to_model_inputs(np.asarray(image), json.loads(target))
        images.append(im)
        targets.append(t)
    return images, targets, [int(i) for i in batch["image_id"]]


class IdleThrottle(ExecutionCallback):
    """Ray Data's scheduling loop blocks (in `ray.wait`) only until a running task has output.
    Once a training split has decoded all it may and waits for its consumer, with no task
    running or with its tasks paused by backpressure, the loop spins, over a thousand steps a
    second: records -> decode, 50 MB of buffer, a consumer taking a batch every 0.25 s, and the
    split coordinator took a full core beside the training worker (and every wake-up pre-empts
    a training thread). A step that changed nothing (no task submitted, no output made or taken)
    is followed by a sleep: 10 ms, doubling up to 80 ms while nothing changes; any change ends
    it. The coordinator then takes 3 % of a core, the consumer served as fast: the decoded blocks
    waiting for it cover far more than 80 ms of training steps."""

    FIRST_S, LONGEST_S = 0.01, 0.08

    def __init__(self) -> None:
        self.pause_s, self.last = self.FIRST_S, None

    def on_execution_step(self, executor) -> None:
        state = operator_progress(executor)
        if state != self.last:
            self.last, self.pause_s = state, self.FIRST_S
            return
        time.sleep(self.pause_s)
        self.pause_s = min(2 * self.pause_s, self.LONGEST_S)


class ExactSplitDataConfig(RayDataConfig):
    """Shards every dataset with `streaming_split(equal=False)`: each image exactly once per
    epoch across the workers, a faster worker taking more. (Ray Train's default, `equal=True`,
    may drop rows to even the shards.) The ranks still step together: see `train_one_epoch`."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = execution_options(self, name)
            ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes,
                                                            IdleThrottle]
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output
