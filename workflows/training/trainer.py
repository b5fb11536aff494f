"""The driver's side of training: the data read once, the Ray Train `TorchTrainer` of a run
(fitting it is the caller's: the train or tune job), and its final model logged.

    data = load_training_data(cfg, paths)            # annotation files read once, label map
    run = TrainingRun.of(cfg, data, run_id, tracking_uri, init_weights)   # what the driver derived
    trainer = build_trainer(cfg, data, run, storage_path, name)
    result = trainer.fit()
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass
from typing import Any, Optional

from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mrcnn.checkpoint import checkpoint_step
from mrcnn.config import ModelConfig
from mrcnn.data.coco import CategoryMap
from workflows.config import JobConfig, Paths
from workflows.ingest import ExactSplitDataConfig, Split, annotations_uri, ensure_shapes, image_dataset, load_split
from workflows.logged_model import log_checkpoint
from workflows.storage import S3Config, fs_uri, join, list_files, local_file, ray_storage


@dataclass
class TrainingData:
    train: Split
    val: Split
    val_annotations: str  # the val split's annotation file (path or URI): the ground truth

    @property
    def labels(self) -> CategoryMap:
        return self.train.categories


def load_training_data(cfg: JobConfig, paths: Paths) -> TrainingData:
    """Generate shapes if configured, read and validate both annotation files, and check
    `model.num_classes` against the training set's categories (0 = follow the data)."""
    ensure_shapes(cfg.data, paths.data_root)
    train = load_split(cfg.data, paths.data_root, "train")
    usable = sum(1 for r in train.records for a in r["annotations"] if not a.get("iscrowd"))
    if not usable:
        raise ValueError(f"data.train_annotations: {train.report.source} has no usable annotation, nothing to "
                         f"train on:\n{train.report}")
    val = load_split(cfg.data, paths.data_root, "val", categories=train.categories)
    classes = train.categories.num_classes
    if cfg.model.num_classes not in (0, classes):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the training set has "
                         f"{classes - 1} categories (+ background); set model.num_classes=0 to follow it")
    return TrainingData(train, val, annotations_uri(cfg.data, paths.data_root, "val"))


def model_config(model: ModelConfig, data: TrainingData) -> ModelConfig:
    """The model a run trains: `model` with its class count from the data when it is 0 (a new
    object; the job's config keeps what the user composed)."""
    if model.num_classes:
        return model
    return dataclasses.replace(model, num_classes=data.labels.num_classes).validate()


@dataclass(frozen=True)
class TrainingRun:
    """What the driver derived for one training run, handed to every worker beside the job's
    config."""

    model: ModelConfig  # the class count from the data
    label_map: dict[str, Any]
    run_id: str  # the MLflow run rank 0 logs to
    tracking_uri: str
    num_train_images: int
    val_annotations: str
    init_weights: Optional[str] = None  # trainer.init_weights resolved: a registry alias pinned, a file absolute
    # (path or URI, step) of a complete checkpoint Ray Train did not record (its driver died first)
    resume_from: Optional[tuple[str, int]] = None

    @classmethod
    def of(cls, cfg: JobConfig, data: TrainingData, run_id: str, tracking_uri: str,
           init_weights: str | None) -> TrainingRun:
        return cls(model_config(cfg.model, data), data.labels.to_dict(), run_id, tracking_uri,
                   len(data.train.records), data.val_annotations, init_weights)


def newest_complete_checkpoint(run_folder: str, s3: S3Config | None = None) -> tuple[str, int] | None:
    """(path or URI, step) of the newest checkpoint file in a Ray Train run's folder that loads, recorded
    by Ray Train or not: a driver killed after a worker wrote `checkpoint_*/checkpoint.pt` but
    before Ray Train recorded it leaves one that Ray Train's own resume does not see. Workers
    resume from whichever of the two is further on (`workflows.training.loop.resume`)."""
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
    cfg: JobConfig,
    data: TrainingData,
    run: TrainingRun,
    storage_path: str,
    name: str,
    callbacks: list | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one training run. Its Ray Train run `storage_path/name` holds the
    checkpoints: building it again with the same pair resumes from the last one. Workers log
    to the MLflow run `run.run_id` from rank 0."""
    trainer = cfg.trainer
    resources = {"CPU": trainer.cpus_per_worker}
    if trainer.use_gpu:
        resources["GPU"] = 1
    ray_path, ray_fs = ray_storage(storage_path, cfg.data.s3)

    def train_loop(config: dict[str, Any]) -> None:
        # Nested, so pickled by value: Ray Train's controller, which unpickles it, then imports
        # nothing of the worker's (torchvision, MLflow); only the training workers do.
        from workflows.training.loop import train_loop as run_loop

        run_loop(config["cfg"], config["run"])

    run = dataclasses.replace(run, resume_from=newest_complete_checkpoint(join(storage_path, name), cfg.data.s3))
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "run": run},
        torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                                     resources_per_worker=resources, placement_strategy=trainer.placement_strategy),
        datasets={"train": image_dataset(data.train, cfg.data, train=True),
                  "val": image_dataset(data.val, cfg.data, train=False)},
        dataset_config=ExactSplitDataConfig(),
        run_config=RunConfig(
            name=name, storage_path=ray_path, storage_filesystem=ray_fs, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=trainer.num_to_keep),
            failure_config=FailureConfig(max_failures=trainer.max_failures),
            # Ray Train's routine lines (worker group started, checkpoint saved, each report)
            # stay in its session log files unless the job is verbose.
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
        ),
    )


def checkpoint_folder(checkpoint: Checkpoint) -> str:
    """The path or s3:// URI of a Ray Train checkpoint's folder (its `checkpoint.pt` inside)."""
    return fs_uri(checkpoint.filesystem, checkpoint.path)


def log_final_model(tracking_uri: str, run_id: str, result: Result, s3: S3Config | None = None) -> str | None:
    """Log the fitted run's last checkpoint as the MLflow run's logged model, its final
    evaluation linked to it; returns the checkpoint file's path or URI (None when the run saved
    none)."""
    if result.checkpoint is None:
        return None
    folder = checkpoint_folder(result.checkpoint)
    log_checkpoint(tracking_uri, run_id, folder, s3)
    return join(folder, "checkpoint.pt")
