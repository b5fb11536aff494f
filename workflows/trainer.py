"""Building the Ray Train `TorchTrainer` of a job (fitting it is the caller's: train or tune).

    data = load_training_data(cfg)        # driver: annotation files read once, label map
    trainer = build_trainer(cfg, data, run_id, tracking_uri, storage_path, name)
    result = trainer.fit()
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mrcnn.data.coco import CategoryMap
from workflows.config import validate
from workflows.data import ExactSplitDataConfig, Split, ensure_shapes, image_dataset, load_split
from workflows.storage import is_s3, join
from workflows.train_loop import train_loop


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Absolute paths, value checks: everything that can fail before Ray starts."""
    validate_cfg = dict(cfg)
    if cfg["model"]["num_classes"] == 0:  # filled from the dataset later; validate the rest
        validate_cfg = {**cfg, "model": {**cfg["model"], "num_classes": 2}}
    validate(validate_cfg)
    cfg["output_dir"] = str(Path(cfg["output_dir"]).resolve())
    ensure_writable(cfg["output_dir"], "output_dir")
    if not is_s3(cfg["data"]["root"]):
        cfg["data"]["root"] = str(Path(cfg["data"]["root"]).resolve())
    return cfg


def ensure_writable(folder: str, key: str) -> None:
    """Create `folder` and write a byte there, or raise naming the key and the path: checkpoints
    and the tracking store go there, and a full disk should stop the job before training."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"{key}={folder} is not writable ({e.strerror or e}); free space there or point "
                      f"{key} at another folder") from None


@dataclass
class TrainingData:
    train: Split
    val: Split

    @property
    def labels(self) -> CategoryMap:
        return self.train.categories


def load_training_data(cfg: dict[str, Any]) -> TrainingData:
    """Generate shapes if configured, read and validate both annotation files, and fill
    `model.num_classes` from the training set's categories (0 = follow the data)."""
    ensure_shapes(cfg["data"])
    train = load_split(cfg["data"], "train")
    usable = sum(1 for r in train.records for a in r["annotations"] if not a.get("iscrowd"))
    if not usable:
        raise ValueError(f"data.train_annotations: {train.report.source} has no usable annotation, nothing to "
                         f"train on:\n{train.report}")
    val = load_split(cfg["data"], "val", categories=train.categories)
    cats = train.categories
    if cfg["model"]["num_classes"] == 0:
        cfg["model"]["num_classes"] = cats.num_classes
    elif cfg["model"]["num_classes"] != cats.num_classes:
        raise ValueError(f"model.num_classes={cfg['model']['num_classes']} but the training set has "
                         f"{cats.num_classes - 1} categories (+ background); set model.num_classes=0 to follow it")
    validate(cfg)
    return TrainingData(train, val)


def init_ray(address: str | None, dashboard: bool = True) -> None:
    """Join `address`, or start a local instance whose training workers are not niced below
    Ray's own processes (measured 1.3 -> 1.0 s a step on 2 cores) and without Ray Train's
    preemption watcher (a local machine is not preempted; one process fewer waking 100+ times a
    second beside the training threads). The dashboard serves the State API, which Ray Train's
    placement-group cleaner queries every few seconds: without it the job frees no placement
    group of a dead controller and logs a warning at each query."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if address is None:
        os.environ.setdefault("RAY_worker_niceness", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        kwargs["include_dashboard"] = dashboard
    ray.init(address=address, log_to_driver=True, **kwargs)


def build_trainer(
    cfg: dict[str, Any],
    data: TrainingData,
    run_id: str,
    tracking_uri: str,
    storage_path: str,
    name: str,
    callbacks: list | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one training run. Its Ray Train run `storage_path/name` holds the
    checkpoints: building it again with the same pair resumes from the last one. Workers log
    to the MLflow run `run_id` from rank 0."""
    cfg = copy.deepcopy(cfg)
    trainer_cfg = cfg["trainer"]
    resources = {"CPU": trainer_cfg["cpus_per_worker"]}
    if trainer_cfg["use_gpu"]:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg, "label_map": data.labels.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri,
            "num_train_images": len(data.train.records),
            "val_annotations": join(cfg["data"]["root"], cfg["data"]["val_annotations"]),
        },
        torch_config=TorchConfig(backend="nccl" if trainer_cfg["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=trainer_cfg["num_workers"], use_gpu=trainer_cfg["use_gpu"],
                                     resources_per_worker=resources,
                                     placement_strategy=trainer_cfg["placement_strategy"]),
        datasets={"train": image_dataset(data.train, cfg["data"], train=True),
                  "val": image_dataset(data.val, cfg["data"], train=False)},
        dataset_config=ExactSplitDataConfig(),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=trainer_cfg["num_to_keep"]),
            failure_config=FailureConfig(max_failures=trainer_cfg["max_failures"]),
        ),
    )
