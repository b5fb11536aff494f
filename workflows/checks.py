"""Value checks of a job's config, every one a job makes before any Ray work, in one place.

Hydra checks keys and types when it composes; these are the values its types cannot express.
Each message names the key and what to set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from workflows.config import DataConfig, InferConfig, JobConfig, ServeConfig, TrainerConfig, value_at, with_values
from workflows.storage import is_s3

JOBS = ("train", "sweep", "evaluate", "promote", "infer", "serve")
SPACE_KINDS = ("choice", "grid", "uniform", "loguniform")
SEARCHERS = ("grid", "random", "optuna")


def validate(cfg: JobConfig, job: str = "train", cpus: float | None = None) -> None:
    """Value checks for `job` (one of JOBS); raise ValueError naming every key that is wrong.
    With `cpus` (a local Ray instance's), also whether the job fits on it."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
    errors = model_errors(cfg) + data_errors(cfg.data) + storage_errors(cfg)
    if job in ("train", "sweep"):
        errors += trainer_errors(cfg.trainer)
        errors += precision_errors("trainer.precision", cfg.trainer.precision, cfg.trainer.use_gpu)
    if job in ("infer", "evaluate", "promote"):
        errors += precision_errors("infer.precision", cfg.infer.precision, cfg.infer.num_gpus > 0)
    if job == "sweep":
        errors += sweep_errors(cfg)
    if job == "infer":
        errors += infer_errors(cfg.infer)
    if job in ("infer", "evaluate", "promote"):  # their models predict on the predictor actors
        errors += predictor_errors(cfg.infer, cpus)
    if job == "serve":
        errors += serve_errors(cfg.serve, cpus)
        errors += precision_errors("serve.precision", cfg.serve.precision, cfg.serve.num_gpus > 0)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


NO_SQLITE_IN_OBJECT_STORAGE = (
    "output_dir={output_dir} is in object storage, where the default tracking store (a SQLite file "
    "under output_dir) cannot live: use an MLflow server, tracking=server (from $MLFLOW_TRACKING_URI) or "
    "tracking.tracking_uri=http://mlflow.example:5000")


def tracking_store_error(output_dir: str, tracking_uri: str | None) -> str | None:
    """Why the default tracking store (a SQLite file under `output_dir`) cannot be used, if so."""
    if is_s3(output_dir) and not tracking_uri:
        return NO_SQLITE_IN_OBJECT_STORAGE.format(output_dir=output_dir)
    return None


def storage_errors(cfg: JobConfig) -> list[str]:
    if "://" in cfg.output_dir and not is_s3(cfg.output_dir):
        return [f"output_dir={cfg.output_dir}: give a local folder or an s3:// URI"]
    error = tracking_store_error(cfg.output_dir, cfg.tracking.tracking_uri)
    return [error] if error else []


def model_errors(cfg: JobConfig) -> list[str]:
    model = cfg.model
    if model.num_classes == 0:  # filled from the dataset later; check the rest
        model = dataclasses.replace(model, num_classes=2)
    return model.errors()


def data_errors(data: DataConfig) -> list[str]:
    errors = []
    if data.missing_images not in ("error", "skip"):
        errors.append(f"data.missing_images={data.missing_images!r} must be 'error' or 'skip'")
    if not 0 <= data.augment.hflip_prob <= 1:
        errors.append("data.augment.hflip_prob must be in [0, 1]")
    if any(s <= 0 for s in data.augment.scales):
        errors.append(f"data.augment.scales={data.augment.scales} must be positive")
    for key in ("decode_batch_size", "decode_concurrency"):
        if getattr(data, key) <= 0:
            errors.append(f"data.{key}={getattr(data, key)} must be > 0")
    return errors


def precision_errors(key: str, precision: str, gpu: bool) -> list[str]:
    """Whether the devices `key` computes on can run `precision` (a CPU's bf16 instructions are
    looked for on this machine: a cluster's CPU nodes are taken to be of its kind)."""
    if precision == "fp32":
        return []
    if precision == "fp16" and not gpu:
        return [f"{key}=fp16 needs CUDA GPUs (trainer.use_gpu=true, infer.num_gpus > 0); on CPUs use bf16 or fp32"]
    if precision not in ("bf16", "fp16"):
        return [f"{key}={precision!r} must be fp32, bf16 or fp16"]
    if not gpu:
        from mrcnn.precision import unsupported

        why = unsupported(precision, "cpu")
        if why:
            return [f"{key}={precision}: {why}"]
    return []


def trainer_errors(trainer: TrainerConfig) -> list[str]:
    errors = []
    if trainer.amp is not None:
        errors.append("trainer.amp is replaced by trainer.precision: write trainer.precision=fp16 for what "
                      "amp=true did on GPUs (autocast with a gradient scaler), bf16 for bf16 (GPUs, and CPUs with "
                      "bf16 instructions), or drop it for fp32")
    for key in ("num_workers", "epochs", "batch_size", "cpus_per_worker", "log_every_steps",
                "num_to_keep", "checkpoint_every_epochs", "eval_every_epochs"):
        if getattr(trainer, key) <= 0:
            errors.append(f"trainer.{key}={getattr(trainer, key)} must be > 0")
    if trainer.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        errors.append(f"trainer.placement_strategy={trainer.placement_strategy!r} must be PACK, SPREAD, "
                      "STRICT_PACK or STRICT_SPREAD")
    if trainer.max_failures < -1:
        errors.append("trainer.max_failures must be >= -1 (-1: retry forever)")
    opt = trainer.optimizer
    if opt.name not in ("sgd", "adamw"):
        errors.append(f"trainer.optimizer.name={opt.name!r} must be 'sgd' or 'adamw'")
    if opt.lr <= 0:
        errors.append(f"trainer.optimizer.lr={opt.lr} must be > 0")
    if any(not 0 < m < 1 for m in opt.milestones):
        errors.append("trainer.optimizer.milestones are fractions of the run, each in (0, 1)")
    return errors


def infer_errors(infer: InferConfig) -> list[str]:
    errors = []
    for key in ("input", "output"):
        if not getattr(infer, key):
            errors.append(f"infer.{key} is not set: give a folder or s3:// prefix, e.g. infer.{key}=/data/images")
    for key in ("max_pixels", "rows_per_file"):
        if getattr(infer, key) <= 0:
            errors.append(f"infer.{key}={getattr(infer, key)} must be > 0")
    if not 0 <= infer.score_threshold <= 1:
        errors.append(f"infer.score_threshold={infer.score_threshold} must be in [0, 1]")
    return errors


def predictor_errors(infer: InferConfig, cpus: float | None) -> list[str]:
    """The predictor actors' settings (batch inference, evaluation, promotion)."""
    errors = []
    for key in ("batch_size", "concurrency", "decode_threads"):
        if getattr(infer, key) <= 0:
            errors.append(f"infer.{key}={getattr(infer, key)} must be > 0")
    if infer.num_gpus < 0 or infer.cpus_per_actor < 0:
        errors.append("infer.num_gpus and infer.cpus_per_actor must be >= 0")
    # The predictor actors hold their CPUs for the whole job: they must leave a quarter of a CPU
    # for a write task, or the job waits forever.
    held = infer.concurrency * infer.cpus_per_actor
    if cpus is not None and held + 0.25 > cpus:
        errors.append(f"infer.concurrency={infer.concurrency} x infer.cpus_per_actor={infer.cpus_per_actor:g} "
                      f"= {held:g} CPUs for the predictors leaves too little of this machine's {cpus:g} CPUs for "
                      "writing (0.25): lower infer.concurrency or infer.cpus_per_actor")
    return errors


def serve_errors(serve: ServeConfig, cpus: float | None) -> list[str]:
    errors = []
    for key in ("port", "max_batch_size", "min_replicas", "max_replicas", "max_ongoing_requests", "max_pixels",
                "max_detections", "max_body_mb", "target_ongoing_requests", "log_every_s"):
        if getattr(serve, key) <= 0:
            errors.append(f"serve.{key}={getattr(serve, key)} must be > 0")
    for key in ("batch_wait_timeout_s", "num_cpus", "num_gpus", "torch_threads", "follow_every_s", "retry_after_s"):
        if getattr(serve, key) < 0:
            errors.append(f"serve.{key}={getattr(serve, key)} must be >= 0")
    if serve.min_replicas > serve.max_replicas:
        errors.append(f"serve.min_replicas={serve.min_replicas} is above serve.max_replicas={serve.max_replicas}")
    if serve.max_ongoing_requests < serve.max_batch_size:
        errors.append(f"serve.max_ongoing_requests={serve.max_ongoing_requests} caps each batch below "
                      f"serve.max_batch_size={serve.max_batch_size}: raise it to at least the batch size")
    if serve.max_queued_requests < 1 and serve.max_queued_requests != -1:
        errors.append(f"serve.max_queued_requests={serve.max_queued_requests} must be > 0 (-1: unbounded, "
                      "requests wait however long the queue grows)")
    if serve.overload_status not in (429, 503):
        errors.append(f"serve.overload_status={serve.overload_status} must be 429 or 503")
    if not 0 <= serve.score_threshold <= 1:
        errors.append(f"serve.score_threshold={serve.score_threshold} must be in [0, 1]")
    if not serve.route_prefix.startswith("/"):
        errors.append(f"serve.route_prefix={serve.route_prefix!r} must start with /")
    if serve.token_env is not None and not serve.token_env:
        errors.append("serve.token_env is empty: name an environment variable holding the token, or drop the key")
    if cpus is not None and serve.min_replicas * serve.num_cpus > cpus:
        errors.append(f"serve.min_replicas={serve.min_replicas} x serve.num_cpus={serve.num_cpus:g} CPUs do not fit "
                      f"in this machine's {cpus:g} CPUs: lower one of them")
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


def sweep_errors(cfg: JobConfig) -> list[str]:
    """The sweep's settings, and its space: every key exists in the job config and every listed
    value passes the training checks."""
    sweep = cfg.sweep
    errors = []
    if sweep.mode not in ("max", "min"):
        errors.append(f"sweep.mode={sweep.mode!r} must be 'max' or 'min'")
    if sweep.search not in SEARCHERS:
        errors.append(f"sweep.search={sweep.search!r} must be one of {', '.join(SEARCHERS)}")
    for key in ("num_samples", "max_concurrent_trials", "startup_trials"):
        if getattr(sweep, key) <= 0:
            errors.append(f"sweep.{key}={getattr(sweep, key)} must be > 0")
    try:
        space = flatten_space(sweep.space)
    except ValueError as e:
        return [*errors, str(e)]
    if not space:
        errors.append("sweep.space is empty: add a dimension, e.g. "
                      "'+sweep.space.model.backbone.name={choice:[resnet18,resnet34]}'")
    for path, spec in space.items():
        try:
            value_at(cfg, path)
        except AttributeError:
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
            try:
                trial = with_values(cfg, {path: value})
            except Exception as e:  # noqa: BLE001 - OmegaConf's validation error: a wrong type
                errors.append(f"sweep.space.{path} value {value!r}: {str(e).splitlines()[0]}")
                continue
            trial_errors = model_errors(trial) + data_errors(trial.data) + trainer_errors(trial.trainer)
            errors += [f"sweep.space.{path} value {value!r}: {e}" for e in trial_errors]
    return errors
