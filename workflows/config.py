"""The job configuration: its schema (dataclasses, registered in Hydra's ConfigStore), the one
boundary where Hydra's composed config becomes typed objects, and what a job derives from it.

    cfg = typed(composed)             # JobConfig: jobs, trainer, workers and pipelines read attributes
    paths = Paths.of(cfg)             # derived once on the driver, passed on; cfg is never written
    trial = with_values(cfg, {"model.backbone.name": "resnet34"})   # a new object (sweeps)

Each default lives here, once; YAML under conf/ holds only what differs, in the groups model/,
data/, trainer/, tracking/, sweep/, infer/, serve/ and experiment/. Unknown keys and wrong types fail
when Hydra composes; `workflows.checks.validate` checks values before any Ray work.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from mrcnn.config import ModelConfig
from workflows.storage import S3Config, absolute

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


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
    # Compute precision (mrcnn.precision): fp32; bf16 (CUDA, or CPUs with bf16 instructions);
    # fp16 (CUDA, with a gradient scaler). The per-epoch evaluation follows it.
    precision: str = "fp32"
    amp: Optional[bool] = None  # replaced by `precision`: set, the job stops saying what to write
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
    # How trials are chosen (Tune's searchers):
    #   grid    every grid point, each random dimension drawn num_samples times a point (Tune's
    #           variant generator: num_samples x the grid's size trials)
    #   random  num_samples trials, every dimension drawn at random (a grid's values as a choice)
    #   optuna  num_samples trials, each chosen by Optuna's TPE from the results so far (random
    #           for the first `startup_trials`); a grid's values as a choice
    search: str = "grid"
    seed: Optional[int] = None  # random and optuna: the sampler's seed (None: a fresh draw)
    startup_trials: int = 4  # optuna: trials drawn at random before TPE models the results
    num_samples: int = 1  # see `search`
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
    # Compute precision of the predictors (mrcnn-infer, mrcnn-evaluate, promote): fp32, bf16
    # (CUDA, or CPUs with bf16 instructions) or fp16 (CUDA). Boxes and masks are written as fp32.
    precision: str = "fp32"
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
class ServeConfig:
    """`mrcnn-serve`: a registered model online on Ray Serve, following its alias."""

    # models:/NAME@ALIAS (followed: the endpoint moves when the alias does), models:/NAME/VERSION,
    # runs:/RUN_ID/model or a checkpoint.pt path.
    model: str = "models:/maskrcnn@champion"
    name: str = "mrcnn"  # the Serve application
    route_prefix: str = "/"
    # The proxy binds this address on every node: keep 127.0.0.1 unless the port sits on a
    # private network (0.0.0.0 on a cluster, behind its network's controls).
    host: str = "127.0.0.1"
    port: int = 8000
    # The name of an environment variable holding a bearer token: requests without it get 401.
    token_env: Optional[str] = None
    max_body_mb: float = 32.0  # larger request bodies get 413
    max_pixels: int = 100_000_000  # images whose header claims more are refused (400)
    # Defaults of the `score_threshold` and `max_detections` query parameters.
    score_threshold: float = 0.5
    max_detections: int = 100
    precision: str = "fp32"  # fp32, bf16 (CUDA, or CPUs with bf16 instructions), fp16 (CUDA)
    # Concurrent requests a replica predicts in one model call: up to max_batch_size images,
    # waiting at most batch_wait_timeout_s for the batch to fill.
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.01
    # Replicas: autoscaled between min and max on the requests in flight per replica.
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    max_replicas_per_node: Optional[int] = None
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    torch_threads: int = 0  # per replica (0: num_cpus, at least 1)
    # Overload: a replica takes max_ongoing_requests at once (at least max_batch_size), each proxy
    # queues max_queued_requests more; past that, `overload_status` (503 or 429) with Retry-After.
    max_ongoing_requests: int = 8
    max_queued_requests: int = 32
    overload_status: int = 503
    retry_after_s: int = 1
    # Seconds between the registry reads that follow an alias (0: the version at start, kept).
    follow_every_s: float = 5.0
    # Seconds between the request counts and latency percentiles logged to the MLflow run.
    log_every_s: float = 30.0


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
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
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def typed(composed: Any) -> JobConfig:
    """Hydra's composed config (a DictConfig of the `job_schema`) as a JobConfig, every group
    its dataclass: the one place a job's config is read by key."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(composed)


def compose_config(overrides: list[str]) -> JobConfig:
    """The job config from Hydra overrides, outside `@hydra.main` (mrcnn-models, notebooks, tests)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return typed(compose(config_name="config", overrides=overrides))


def with_values(cfg: JobConfig, values: dict[str, Any]) -> JobConfig:
    """A new JobConfig: `cfg` with each dotted key set to its value, type-checked as an override
    on the command line would be (a sweep's trial). `cfg` is left as it is."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    for path, value in values.items():
        OmegaConf.update(node, path, value, merge=False)
    return OmegaConf.to_object(node)


def value_at(cfg: Any, path: str) -> Any:
    """The value of a dotted key (`model.backbone.name`); AttributeError when there is none."""
    return functools.reduce(getattr, path.split("."), cfg)


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config object (or any dataclass of it) as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def training_params(cfg: JobConfig) -> dict[str, Any]:
    """The config without the groups of other jobs (sweep, infer, serve): a training run's params."""
    return {k: v for k, v in as_dict(cfg).items() if k not in ("sweep", "infer", "serve")}


@dataclass(frozen=True)
class Paths:
    """The job's locations, derived once on the driver: local paths made absolute (Ray's workers
    run in other folders), s3:// URIs as given."""

    output_dir: str
    data_root: str
    infer_input: Optional[str] = None
    infer_output: Optional[str] = None

    @classmethod
    def of(cls, cfg: JobConfig) -> Paths:
        def maybe(value: Optional[str]) -> Optional[str]:
            return absolute(value) if value else None

        return cls(absolute(cfg.output_dir), absolute(cfg.data.root), maybe(cfg.infer.input), maybe(cfg.infer.output))

    def labelled(self) -> dict[str, Any]:
        """{config key: derived value} for the run's record."""
        return {"output_dir": self.output_dir, "data.root": self.data_root, "infer.input": self.infer_input,
                "infer.output": self.infer_output}
