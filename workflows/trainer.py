"""Building the Ray Train `TorchTrainer` of a job (fitting it is the caller's: train or tune).

    data = load_training_data(cfg)        # driver: annotation files read once, label map
    trainer = build_trainer(cfg, data, run_id, tracking_uri, storage_path, name)
    result = trainer.fit()
"""

from __future__ import annotations

import copy
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mrcnn.checkpoint import checkpoint_step, load_weights_file
from mrcnn.data.coco import CategoryMap
from workflows.config import validate
from workflows.ingest import ExactSplitDataConfig, Split, ensure_shapes, image_dataset, load_split
from workflows.registry import log_model
from workflows.storage import fs_uri, join, list_files, local_file, ray_storage


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
    validate(cfg, "train")
    return TrainingData(train, val)


def newest_complete_checkpoint(run_folder: str, s3: dict[str, Any] | None = None) -> tuple[str, int] | None:
    """(path or URI, step) of the newest checkpoint file in a Ray Train run's folder that loads, recorded
    by Ray Train or not: a driver killed after a worker wrote `checkpoint_*/checkpoint.pt` but
    before Ray Train recorded it leaves one that Ray Train's own resume does not see. Workers
    resume from whichever of the two is further on (`workflows.worker.resume`)."""
    files = [f for f in list_files(run_folder, s3, suffixes=("/checkpoint.pt",))
             if posixpath.basename(posixpath.dirname(f)).startswith("checkpoint_")
             and posixpath.dirname(posixpath.dirname(f)) == run_folder.rstrip("/")]
    for f in sorted(files, reverse=True):  # Ray Train's folder names sort by time
        with local_file(f, s3) as path:
            step = checkpoint_step(path)
        if step is not None:
            return f, step
    return None


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
    ray_path, ray_fs = ray_storage(storage_path, cfg["data"]["s3"])

    def train_loop(config: dict[str, Any]) -> None:
        # Nested, so pickled by value: Ray Train's controller, which unpickles it, then imports
        # nothing of the worker's (torchvision, MLflow); only the training workers do.
        from workflows.worker import train_loop as run

        run(config)

    return TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg, "label_map": data.labels.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri,
            "num_train_images": len(data.train.records),
            "val_annotations": join(cfg["data"]["root"], cfg["data"]["val_annotations"]),
            "resume_from": newest_complete_checkpoint(join(storage_path, name), cfg["data"]["s3"]),
        },
        torch_config=TorchConfig(backend="nccl" if trainer_cfg["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=trainer_cfg["num_workers"], use_gpu=trainer_cfg["use_gpu"],
                                     resources_per_worker=resources,
                                     placement_strategy=trainer_cfg["placement_strategy"]),
        datasets={"train": image_dataset(data.train, cfg["data"], train=True),
                  "val": image_dataset(data.val, cfg["data"], train=False)},
        dataset_config=ExactSplitDataConfig(),
        run_config=RunConfig(
            name=name, storage_path=ray_path, storage_filesystem=ray_fs, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=trainer_cfg["num_to_keep"]),
            failure_config=FailureConfig(max_failures=trainer_cfg["max_failures"]),
            # Ray Train's routine lines (worker group started, checkpoint saved, each report)
            # stay in its session log files unless the job is verbose.
            logging_config=LoggingConfig(log_level="INFO" if cfg["verbose"] else "WARNING"),
        ),
    )


def checkpoint_file(checkpoint: Checkpoint) -> str:
    """The path or s3:// URI of a Ray Train checkpoint's `checkpoint.pt`."""
    return f"{fs_uri(checkpoint.filesystem, checkpoint.path)}/checkpoint.pt"


def log_final_model(tracking_uri: str, run_id: str, result: Result) -> str | None:
    """Log the fitted run's last checkpoint as the MLflow run's logged model, its final
    evaluation linked to it; returns the checkpoint file's path or URI (None when the run saved
    none)."""
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        payload = load_weights_file(Path(d) / "checkpoint.pt")
    log_model(tracking_uri, run_id, payload, step=payload.get("step"))
    return checkpoint_file(result.checkpoint)
