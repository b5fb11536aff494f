"""`mrcnn-train`: Mask R-CNN on Ray Train, tracked in MLflow.

    run(cfg)    # cfg: the typed job config (workflows.config.JobConfig)

A `run_name` names the Ray Train run and the MLflow run: the same name again resumes both from
the last checkpoint. Without one, each job gets a new unique name.
"""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workflows.config import JobConfig, training_params
from workflows.jobs.frame import Job
from workflows.registry import CANDIDATE, ResolvedModel, register_model, resolve_model
from workflows.storage import S3Config, join, write_bytes
from workflows.training.trainer import (
    TrainingData,
    TrainingRun,
    build_trainer,
    checkpoint_folder,
    load_training_data,
    log_final_model,
)


def log_data_report(client: MlflowClient, run_id: str, data: TrainingData) -> None:
    """What the annotation files' validation skipped or fixed, as a run artifact and counts
    (tags `data.train_problems`, `data.val_problems`)."""
    for split in (data.train, data.val):
        client.log_text(run_id, str(split.report) + "\n", f"data_report/{split.name}.txt")
        # tags, not metrics: one number each, no chart to draw
        client.set_tag(run_id, f"data.{split.name}_problems", str(sum(split.report.counts.values())))


def starting_point(init_weights: str | None, tracking_uri: str) -> ResolvedModel | None:
    """The model a fine-tuning run starts from (`trainer.init_weights`), checked before any Ray
    work; every worker loads its resolved URI."""
    return resolve_model(init_weights, tracking_uri, "trainer.init_weights") if init_weights else None


def starting_point_tags(start: ResolvedModel | None) -> dict[str, str]:
    """The run's tags `init_weights` and, for a registered model, `init_model_version`."""
    if start is None:
        return {}
    return {"init_weights": start.given, **({"init_model_version": start.registered} if start.registered else {})}


def report_unlogged(unlogged: list[str], run_id: str, folder: str, s3: S3Config) -> None:
    """Name the MLflow writes the workers could not send (the server was away until the end),
    and keep the list beside the run's checkpoints."""
    if not unlogged:
        return
    listed = join(folder, "mlflow_unlogged.txt")
    write_bytes(listed, ("\n".join(unlogged) + "\n").encode(), s3)
    print(f"WARNING: {len(unlogged)} MLflow writes of run {run_id} could not be sent (the server was "
          f"unreachable); they are listed in {listed}, the first:")
    for what in unlogged[:5]:
        print(f"  {what}")


def run(cfg: JobConfig) -> dict[str, Any]:
    """Train; returns {run_id, tracking_uri, checkpoint (path), version, metrics}."""
    with Job(cfg, "train") as job:
        data = load_training_data(cfg, job.paths)
        start = starting_point(cfg.trainer.init_weights, job.tracking_uri)
        job.start_ray()
        derived = {"model.num_classes": data.labels.num_classes, "trainer.init_weights": start and start.uri}
        run_id = job.open_run("mrcnn", training_params(cfg), tags=starting_point_tags(start), name=cfg.run_name,
                              derived=derived)
        log_data_report(job.client, run_id, data)
        storage = join(job.paths.output_dir, "ray_results")
        training = TrainingRun.of(cfg, data, run_id, job.tracking_uri, start and start.uri)
        result = build_trainer(cfg, data, training, storage_path=storage, name=job.run_name).fit()
        report_unlogged((result.metrics or {}).get("mlflow_unlogged") or [], run_id, join(storage, job.run_name),
                        cfg.data.s3)
        registered = cfg.tracking.registered_model
        try:
            checkpoint = log_final_model(job.tracking_uri, run_id, result, cfg.data.s3)
            version = register_model(job.client, run_id, registered) if registered and checkpoint else None
        except MlflowException as e:
            where = join(checkpoint_folder(result.checkpoint), "checkpoint.pt") if result.checkpoint else "none"
            raise ConnectionError(
                f"training finished but MLflow at {job.tracking_uri} failed while logging the model "
                f"({str(e)[:300]}); the final checkpoint is {where} (`infer.model=` and `mrcnn-evaluate` take it "
                "as it is)") from None
        if version:
            print(f"registered {registered} version {version} (alias {CANDIDATE})")
        if checkpoint:
            print(f"final checkpoint: {checkpoint}")
        return {"run_id": run_id, "tracking_uri": job.tracking_uri, "metrics": result.metrics,
                "checkpoint": checkpoint, "version": version}
