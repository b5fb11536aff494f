"""Ray Data ingestion: local folders, s3:// on a local S3 server, and Ray Train sharding."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from mrcnn.masks import decode_rle_masks
from tests.helpers.s3server import s3_server, set_credentials, upload_folder
from workflows.config import AugmentConfig, DataConfig
from workflows.ingest import (
    ExactSplitDataConfig,
    batch_to_model_inputs,
    image_dataset,
    load_split,
)


def _data_cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **kw)


def _load(data: DataConfig, split: str):
    return load_split(data, data.root, split)


def test_local_split_streams_decoded_images_with_rle(ray_local, shapes_root):
    cfg = _data_cfg(shapes_root)
    split = _load(cfg, "val")
    rows = image_dataset(split, cfg, train=False).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(r["image_id"] for r in split.records)
    for row in rows:
        assert row["image"].dtype == np.uint8 and row["image"].shape == (3, 96, 96)
        anns = json.loads(row["target"])
        masks = decode_rle_masks([a["rle"] for a in anns], (96, 96))  # RLE travels, not pixels
        assert masks.shape[0] == len(anns) and all(m.sum() > 0 for m in masks)
    images, targets, ids = batch_to_model_inputs(
        {"image": [r["image"] for r in rows[:2]], "target": [r["target"] for r in rows[:2]],
         "image_id": [r["image_id"] for r in rows[:2]]})
    assert images[0].dtype == torch.float32 and targets[0]["boxes"].shape[1] == 4
    assert isinstance(targets[0]["masks"], list) and len(ids) == 2


def test_training_augmentation_flips_and_rescales(ray_local, shapes_root):
    cfg = _data_cfg(shapes_root)
    cfg.augment = AugmentConfig(hflip_prob=1.0, scales=[64], max_size=1000)
    split = _load(cfg, "val")
    rows = {r["image_id"]: r for r in image_dataset(split, cfg, train=True).take_all()}
    plain = {r["image_id"]: r for r in image_dataset(split, _data_cfg(shapes_root), train=False).take_all()}
    for image_id, row in rows.items():
        assert row["image"].shape == (3, 64, 64)
        a = json.loads(row["target"])[0]
        b = json.loads(plain[image_id]["target"])[0]
        x1, y1, x2, y2 = b["bbox"]
        assert a["bbox"] == pytest.approx([(96 - x2) * 2 / 3, y1 * 2 / 3, (96 - x1) * 2 / 3, y2 * 2 / 3])


def test_corrupt_image_is_dropped_not_fatal(ray_local, shapes_root, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    (root / "val/000001.jpg").write_bytes(b"truncated")
    cfg = _data_cfg(root)
    split = _load(cfg, "val")
    rows = image_dataset(split, cfg, train=False).take_all()
    assert len(rows) == len(split.records) - 1
    assert "val/000001.jpg" not in {r["file_name"] for r in rows}


def test_missing_image_fails_before_any_work(shapes_root, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    (root / "train/000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="train/000003.jpg"):
        _load(_data_cfg(root), "train")
    split = _load(_data_cfg(root, missing_images="skip"), "train")
    assert split.report.counts["missing image file"] == 1
    with pytest.raises(FileNotFoundError, match="data.val_annotations: .*nope.json does not exist"):
        _load(_data_cfg(root, val_annotations="nope.json"), "val")


def test_s3_root_on_a_local_s3_server(ray_local, shapes_root):
    set_credentials()
    with s3_server() as endpoint:
        upload_folder(endpoint, "datasets", shapes_root, "shapes")
        cfg = _data_cfg("s3://datasets/shapes")
        cfg.s3.endpoint_override = endpoint
        cfg.s3.access_key = cfg.s3.secret_key = "testing"
        split = _load(cfg, "val")
        assert split.records[0]["path"].startswith("s3://datasets/shapes/val/")
        rows = image_dataset(split, cfg, train=False).take_all()
        local = {r["image_id"]: r for r in image_dataset(
            _load(_data_cfg(shapes_root), "val"), _data_cfg(shapes_root), train=False).take_all()}
        assert len(rows) == len(local) == 5
        for r in rows:
            assert np.array_equal(r["image"], local[r["image_id"]]["image"])


def _collect_ids(config):
    import ray.train

    ctx = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(2):
        ids = []
        for batch in shard.iter_batches(batch_size=2, batch_format="numpy"):
            ids += [int(i) for i in batch["image_id"]]
        path = f"{config['out']}/rank{ctx.get_world_rank()}_epoch{epoch}.json"
        with open(path, "w") as f:
            json.dump({"ids": ids, "node": ray.get_runtime_context().get_node_id()}, f)


@pytest.mark.slow
def test_two_workers_see_each_image_exactly_once_per_epoch(ray_local, shapes_root, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _data_cfg(shapes_root)
    split = _load(cfg, "train")  # 12 images: shards of any sizes (a dynamic split), none lost
    trainer = TorchTrainer(
        _collect_ids, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": image_dataset(split, cfg, train=True)},
        dataset_config=ExactSplitDataConfig(),
        run_config=RunConfig(name="shard-test", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    expected = sorted(r["image_id"] for r in split.records)
    for epoch in range(2):
        shards = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text())["ids"] for r in (0, 1)]
        assert sorted(shards[0] + shards[1]) == expected


def _wide_rows(batch):
    return {"x": np.repeat(np.asarray(batch["id"])[:, None], 50_000, axis=1).astype(np.float32)}  # 200 KB


@pytest.mark.slow
def test_split_rests_while_its_consumer_is_slow(ray_local):
    """A training split whose consumer is slower than decoding ends up with its tasks paused by
    backpressure; its coordinator's scheduling loop must then rest instead of spinning (Ray
    Data's own loop runs over a thousand steps a second there, a full core beside training).
    Measured as the loop's steps a second, counted inside the coordinator."""
    import ray
    from ray.data import ExecutionOptions, ExecutionResources

    from tests.helpers.ingest import TALLY, StepCounter, StepTally

    tally = StepTally.options(name=TALLY).remote()
    # 1,200 rows of 200 KB: more than the 91 batches taken plus the 50 MB buffer
    ds = ray.data.from_items([{"id": i} for i in range(1_200)], override_num_blocks=64)
    ds = ds.map_batches(_wide_rows, batch_size=8)
    ds.context.custom_execution_callback_classes = [StepCounter]
    options = ExecutionOptions(resource_limits=ExecutionResources(object_store_memory=50e6))
    shard = ExactSplitDataConfig(execution_options=options).configure(
        {"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)[0]["train"]
    batches = iter(shard.iter_batches(batch_size=4))
    try:
        for _ in range(31):  # past the start, until the budget is full and the tasks pause
            next(batches)
            time.sleep(0.1)
        steps0, t0 = ray.get(tally.total.remote()), time.monotonic()
        for _ in range(60):
            next(batches)
            time.sleep(0.1)
        rate = (ray.get(tally.total.remote()) - steps0) / (time.monotonic() - t0)
    finally:  # to the end: a split left running would touch Ray after the module shuts it down
        for _ in batches:
            pass
        ray.kill(tally)
    # Resting: a sleep of 10-80 ms between steps that change nothing, about 10-40 steps a second
    # with a batch taken every 0.1 s; spinning: over a thousand.
    print(f"split coordinator: {rate:.0f} scheduling steps a second while its consumer is slow")
    assert rate < 150, f"the split coordinator made {rate:.0f} scheduling steps a second waiting for its consumer"
