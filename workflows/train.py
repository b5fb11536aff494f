"""The training job: Mask R-CNN on Ray Train, tracked in MLflow (`mrcnn-train`).

    run(cfg)    # cfg: the composed job config as a plain dict (workflows.config)

A `run_name` names the Ray Train run and the MLflow run: the same name again resumes both from
the last checkpoint. Without one, each job gets a new unique name.
"""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workflows.config import training_params
from workflows.job import Job
from workflows.registry import CANDIDATE, ModelURI, check_model, register_model
from workflows.storage import join, write_bytes
from workflows.trainer import TrainingData, build_trainer, checkpoint_file, load_training_data, log_final_model


def log_data_report(client: MlflowClient, run_id: str, data: TrainingData) -> None:
    """What the annotation files' validation skipped or fixed, as a run artifact and counts
    (tags `data.train_problems`, `data.val_problems`)."""
    for split in (data.train, data.val):
        client.log_text(run_id, str(split.report) + "\n", f"data_report/{split.name}.txt")
        # tags, not metrics: one number each, no chart to draw
        client.set_tag(run_id, f"data.{split.name}_problems", str(sum(split.report.counts.values())))


def starting_point(init_weights: str | None, tracking_uri: str) -> tuple[str | None, dict[str, str]]:
    """The model a fine-tuning run starts from, checked before any Ray work: the URI every
    worker loads (a registry version pinned, even if its alias moves meanwhile; a file made
    absolute) and the run's tags `init_weights` and, for a registered model,
    `init_model_version` (NAME/VERSION)."""
    if not init_weights:
        return None, {}
    resolved = check_model(init_weights, tracking_uri, "trainer.init_weights")
    ref = ModelURI.parse(init_weights)
    if ref.kind == "registry":
        return ref.pinned(resolved), {"init_weights": init_weights, "init_model_version": f"{ref.name}/{resolved}"}
    return (resolved if ref.kind == "file" else init_weights), {"init_weights": init_weights}


def report_unlogged(unlogged: list[str], run_id: str, folder: str, s3: dict[str, Any]) -> None:
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


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train; returns {run_id, tracking_uri, checkpoint (path), version, metrics}."""
    with Job(cfg, "train") as job:
        cfg = job.cfg
        data = load_training_data(cfg)
        init_weights, tags = starting_point(cfg["trainer"]["init_weights"], job.tracking_uri)
        job.start_ray()
        run_id = job.open_run("mrcnn", training_params(cfg), tags=tags, name=cfg["run_name"])
        cfg["trainer"]["init_weights"] = init_weights
        cfg["run_name"] = job.run_name
        log_data_report(job.client, run_id, data)
        storage = join(cfg["output_dir"], "ray_results")
        result = build_trainer(training_params(cfg), data, run_id, job.tracking_uri, storage_path=storage,
                               name=job.run_name).fit()
        report_unlogged((result.metrics or {}).get("mlflow_unlogged") or [], run_id, join(storage, job.run_name),
                        cfg["data"]["s3"])
        registered = cfg["tracking"]["registered_model"]
        try:
            checkpoint = log_final_model(job.tracking_uri, run_id, result)
            version = register_model(job.client, run_id, registered) if registered and checkpoint else None
        except MlflowException as e:
            where = checkpoint_file(result.checkpoint) if result.checkpoint else "none"
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
