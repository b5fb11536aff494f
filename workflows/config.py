"""The job configuration schema (dataclasses), registered in Hydra's ConfigStore.

Each default lives here, once; YAML under conf/ holds only what differs, in the groups model/,
data/, trainer/, tracking/, sweep/, infer/ and experiment/. Unknown keys and wrong types fail
when Hydra composes; `validate` checks values before any Ray work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mrcnn.config import ModelConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass
class S3Config:
    """pyarrow S3 settings for every s3:// URI of a job (data, output_dir, infer's input and
    output); a key left unset comes from the AWS environment / files, as for the AWS CLI."""

    endpoint_override: Optional[str] = None
    region: Optional[str] = None
    access_key: Optional[str] = None
    secret_key: Optional[str] = None
    anonymous: bool = False


@dataclass
class AugmentConfig:
    hflip_prob: float = 0.5
    # Shorter-side sizes drawn per training image in the data pipeline: fewer bytes through the
    # object store for large images. The model's transform (model.transform.min_size, drawn per
    # image in training) still sets the scale the network sees. Empty: images keep their size.
    scales: List[int] = field(default_factory=list)
    max_size: int = 1333


@dataclass
class ShapesGenConfig:
    """The synthetic shapes dataset's sizes (`mrcnn-shapes` takes the same defaults)."""

    train: int = 256
    val: int = 128  # enough images for a stable mask AP
    size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "shapes"
    # Local folder or s3://bucket/prefix; the paths below are relative to it unless absolute.
    root: str = "data/shapes"
    train_annotations: str = "annotations/instances_train.json"
    train_images: str = ""
    val_annotations: str = "annotations/instances_val.json"
    val_images: str = ""
    # "error": a missing image file stops the job before training, naming it; "skip": dropped.
    missing_images: str = "error"
    # Generate the synthetic shapes dataset at `root` when it is missing (shapes only).
    generate: Optional[ShapesGenConfig] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    s3: S3Config = field(default_factory=S3Config)
    # Images decoded per map_batches call, and how many such tasks run at once.
    decode_batch_size: int = 8
    decode_concurrency: int = 2


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.02  # for `base_batch_size` images a step; scaled linearly with the real total
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    # LR x gamma at these fractions of the total steps (the paper's 1x: 2/3 and 8/9).
    milestones: List[float] = field(default_factory=lambda: [0.667, 0.889])
    gamma: float = 0.1
    grad_clip_norm: Optional[float] = None


@dataclass
class TrainerConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Ray placement of the workers: PACK fills a node first, SPREAD puts them on different nodes.
    placement_strategy: str = "PACK"
    amp: bool = False  # autocast + GradScaler; used on GPU only
    epochs: int = 1
    batch_size: int = 2  # per worker
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    log_every_steps: int = 10
    eval_every_epochs: int = 1
    checkpoint_every_epochs: int = 1
    num_to_keep: int = 2
    max_failures: int = 0
    # Weights to start from: a torchvision Mask R-CNN state dict file (fine-tuning).
    init_weights: Optional[str] = None
    # Torch threads per worker (0: leave torch's default).
    torch_threads: int = 0
    # Stop after this many optimizer steps in total (0: run all epochs).
    max_steps: int = 0


@dataclass
class TrackingConfig:
    # None: a SQLite file under output_dir (absolute). On a cluster: http://mlflow-host:5000.
    tracking_uri: Optional[str] = None
    experiment: str = "maskrcnn"
    log_images: int = 4
    # Register the final model under this name (alias `candidate`); None: do not register.
    registered_model: Optional[str] = None


@dataclass
class AshaConfig:
    """ASHA early stopping on the epoch the workers report."""

    grace_period: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: int = 2
    max_epochs: int = 0  # 0: trainer.epochs


@dataclass
class SweepConfig:
    """`mrcnn-tune`. `space` maps a config path to one of {choice: [...]}, {grid: [...]},
    {uniform: [low, high]}, {loguniform: [low, high]}; nested keys are read as dotted paths, so
    `+sweep.space.trainer.optimizer.lr={loguniform:[1e-4,1e-2]}` adds a dimension."""

    # Rerunning the same name resumes the sweep; None: a new name from the clock.
    name: Optional[str] = None
    metric: str = "segm_AP"
    mode: str = "max"
    num_samples: int = 1  # samples of the random dimensions (each grid point gets this many)
    max_concurrent_trials: int = 2
    space: Dict[str, Any] = field(default_factory=dict)
    scheduler: AshaConfig = field(default_factory=AshaConfig)
    # Register the best trial's model under tracking.registered_model with this alias.
    register_alias: str = "candidate"


@dataclass
class InferConfig:
    """`mrcnn-infer`: segment an image store with a registered or checkpointed model."""

    # A folder (walked recursively), an s3:// prefix, or a manifest (.txt, .csv or .parquet
    # with a `path` column).
    input: Optional[str] = None
    # A folder or s3:// prefix for the Parquet rows (and the optional outputs below).
    output: Optional[str] = None
    # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint.pt path.
    model: str = "models:/maskrcnn@champion"
    extensions: List[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".tif",
                                                           ".tiff", ".webp"])
    batch_size: int = 4  # images a predictor call
    concurrency: int = 1  # predictor actors (each loads the model once)
    num_gpus: float = 0.0  # per predictor actor
    cpus_per_actor: float = 1.0
    torch_threads: int = 0  # per predictor actor (0: Ray's default, cpus_per_actor)
    decode_threads: int = 1  # per predictor actor: threads that read and decode a batch's images
    score_threshold: float = 0.5
    max_detections: int = 100
    # Images whose header claims more pixels than this become error rows (never decoded).
    max_pixels: int = 100_000_000
    # Rerun: retry the inputs whose row holds an error (their old rows are removed first).
    retry_errors: bool = False
    # A COCO annotation file of the same images: also write coco_results.json, its image ids
    # matched by file name.
    coco_annotations: Optional[str] = None
    overlays: int = 8  # overlay PNGs for the first K images (0: none)
    # Rows buffered into one Parquet file: larger files, but more work redone after a crash.
    rows_per_file: int = 256


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    # Ray Train run name: rerunning with the same name resumes from its last checkpoint.
    run_name: Optional[str] = None
    # Checkpoints, MLflow SQLite and the shapes data default under here (local or shared FS).
    output_dir: str = "outputs"
    seed: int = 0
    # Ray address: None starts or joins a local instance ("auto" under `ray job submit`).
    ray_address: Optional[str] = None
    # Ray's and pycocotools' routine output on the console too (it always goes to the job's log).
    verbose: bool = False


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain dict: what crosses to Ray workers and into checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def training_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys of other jobs (sweep, infer): a training run's params."""
    return {k: v for k, v in cfg.items() if k not in ("sweep", "infer")}


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The job config from Hydra overrides, outside `@hydra.main` (mrcnn-models, notebooks)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_container(compose(config_name="config", overrides=overrides))


# ---------------------------------------------------------------------------------------------
# Value checks: every one a job makes before any Ray work, in one place.

JOBS = ("train", "sweep", "evaluate", "promote", "infer")
SPACE_KINDS = ("choice", "grid", "uniform", "loguniform")


def validate(cfg: dict[str, Any], job: str = "train", cpus: float | None = None) -> None:
    """Value checks Hydra's types cannot express, for `job` (one of JOBS); raise ValueError
    naming every key that is wrong. With `cpus` (a local Ray instance's), also whether the job
    fits on it."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
    errors = model_errors(cfg) + data_errors(cfg["data"]) + storage_errors(cfg)
    if job in ("train", "sweep"):
        errors += trainer_errors(cfg["trainer"])
    if job == "sweep":
        errors += sweep_errors(cfg)
    if job == "infer":
        errors += infer_errors(cfg["infer"], cpus)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


NO_SQLITE_IN_OBJECT_STORAGE = (
    "output_dir={output_dir} is in object storage, where the default tracking store (a SQLite file "
    "under output_dir) cannot live: use an MLflow server, tracking=server (from $MLFLOW_TRACKING_URI) or "
    "tracking.tracking_uri=http://mlflow.example:5000")


def storage_errors(cfg: dict[str, Any]) -> list[str]:
    output_dir = str(cfg["output_dir"])
    if "://" in output_dir and not output_dir.startswith("s3://"):
        return [f"output_dir={output_dir}: give a local folder or an s3:// URI"]
    if output_dir.startswith("s3://") and not cfg["tracking"]["tracking_uri"]:
        return [NO_SQLITE_IN_OBJECT_STORAGE.format(output_dir=output_dir)]
    return []


def model_errors(cfg: dict[str, Any]) -> list[str]:
    model = cfg["model"]
    if model["num_classes"] == 0:  # filled from the dataset later; check the rest
        model = {**model, "num_classes": 2}
    try:
        ModelConfig.from_dict(model).validate()
    except ValueError as e:
        lines = str(e).splitlines()
        return [line.strip() for line in lines[1:]] if len(lines) > 1 else lines
    return []


def data_errors(data: dict[str, Any]) -> list[str]:
    errors = []
    if data["missing_images"] not in ("error", "skip"):
        errors.append(f"data.missing_images={data['missing_images']!r} must be 'error' or 'skip'")
    if not 0 <= data["augment"]["hflip_prob"] <= 1:
        errors.append("data.augment.hflip_prob must be in [0, 1]")
    if any(s <= 0 for s in data["augment"]["scales"]):
        errors.append(f"data.augment.scales={data['augment']['scales']} must be positive")
    for key in ("decode_batch_size", "decode_concurrency"):
        if data[key] <= 0:
            errors.append(f"data.{key}={data[key]} must be > 0")
    return errors


def trainer_errors(trainer: dict[str, Any]) -> list[str]:
    errors = []
    for key in ("num_workers", "epochs", "batch_size", "cpus_per_worker", "log_every_steps",
                "num_to_keep", "checkpoint_every_epochs", "eval_every_epochs"):
        if trainer[key] <= 0:
            errors.append(f"trainer.{key}={trainer[key]} must be > 0")
    if trainer["placement_strategy"] not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        errors.append(f"trainer.placement_strategy={trainer['placement_strategy']!r} must be PACK, SPREAD, "
                      "STRICT_PACK or STRICT_SPREAD")
    if trainer["max_failures"] < -1:
        errors.append("trainer.max_failures must be >= -1 (-1: retry forever)")
    opt = trainer["optimizer"]
    if opt["name"] not in ("sgd", "adamw"):
        errors.append(f"trainer.optimizer.name={opt['name']!r} must be 'sgd' or 'adamw'")
    if opt["lr"] <= 0:
        errors.append(f"trainer.optimizer.lr={opt['lr']} must be > 0")
    if any(not 0 < m < 1 for m in opt["milestones"]):
        errors.append("trainer.optimizer.milestones are fractions of the run, each in (0, 1)")
    return errors


def infer_errors(infer: dict[str, Any], cpus: float | None) -> list[str]:
    errors = []
    for key in ("input", "output"):
        if not infer[key]:
            errors.append(f"infer.{key} is not set: give a folder or s3:// prefix, e.g. infer.{key}=/data/images")
    for key in ("batch_size", "concurrency", "decode_threads", "max_pixels", "rows_per_file"):
        if infer[key] <= 0:
            errors.append(f"infer.{key}={infer[key]} must be > 0")
    if not 0 <= infer["score_threshold"] <= 1:
        errors.append(f"infer.score_threshold={infer['score_threshold']} must be in [0, 1]")
    # The predictor actors hold their CPUs for the whole job: they must leave a quarter of a CPU
    # for a write task, or the job waits forever.
    held = infer["concurrency"] * infer["cpus_per_actor"]
    if cpus is not None and held + 0.25 > cpus:
        errors.append(f"infer.concurrency={infer['concurrency']} x infer.cpus_per_actor={infer['cpus_per_actor']:g} "
                      f"= {held:g} CPUs for the predictors leaves too little of this machine's {cpus:g} CPUs for "
                      "writing (0.25): lower infer.concurrency or infer.cpus_per_actor")
    return errors


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """`sweep.space`, nested or dotted keys -> {"model.backbone.name": {"grid": [...]}, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and set(value) <= set(SPACE_KINDS):
            if len(value) != 1:
                raise ValueError(f"sweep.space.{path} has {sorted(value)}: give exactly one of "
                                 f"{', '.join(SPACE_KINDS)}")
            out[path] = value
        elif isinstance(value, dict) and value:
            out.update(flatten_space(value, path + "."))
        else:
            raise ValueError(f"sweep.space.{path}: expected {{choice|grid: [values]}} or "
                             f"{{uniform|loguniform: [low, high]}}, got {value!r}")
    return out


def get_path(cfg: dict[str, Any], path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def set_path(cfg: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = copy.deepcopy(value)


def sweep_errors(cfg: dict[str, Any]) -> list[str]:
    """The sweep's settings, and its space: every key exists in the job config and every listed
    value passes the training checks."""
    sweep = cfg["sweep"]
    errors = []
    if sweep["mode"] not in ("max", "min"):
        errors.append(f"sweep.mode={sweep['mode']!r} must be 'max' or 'min'")
    for key in ("num_samples", "max_concurrent_trials"):
        if sweep[key] <= 0:
            errors.append(f"sweep.{key}={sweep[key]} must be > 0")
    try:
        space = flatten_space(sweep["space"])
    except ValueError as e:
        return [*errors, str(e)]
    if not space:
        errors.append("sweep.space is empty: add a dimension, e.g. "
                      "'+sweep.space.model.backbone.name={choice:[resnet18,resnet34]}'")
    for path, spec in space.items():
        try:
            get_path(cfg, path)
        except (KeyError, TypeError):
            errors.append(f"sweep.space.{path}: {path!r} is not a key of the job config "
                          "(see `mrcnn-train --cfg job` for the keys)")
            continue
        kind, values = next(iter(spec.items()))
        if kind in ("uniform", "loguniform"):
            if not (isinstance(values, list) and len(values) == 2 and values[0] < values[1]):
                errors.append(f"sweep.space.{path}.{kind} must be [low, high] with low < high, got {values}")
                continue
            if kind == "loguniform" and values[0] <= 0:
                errors.append(f"sweep.space.{path}.loguniform needs low > 0, got {values}")
                continue
            values = values[:1]
        elif not isinstance(values, list) or not values:
            errors.append(f"sweep.space.{path}.{kind} must be a non-empty list of values")
            continue
        for value in values:
            trial = copy.deepcopy(cfg)
            set_path(trial, path, value)
            trial_errors = model_errors(trial) + data_errors(trial["data"]) + trainer_errors(trial["trainer"])
            errors += [f"sweep.space.{path} value {value!r}: {e}" for e in trial_errors]
    return errors
