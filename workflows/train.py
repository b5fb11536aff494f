"""`mrcnn-train`: Mask R-CNN on Ray Train, composed by Hydra, tracked in MLflow.

    mrcnn-train                                   # shapes demo, local Ray, SQLite MLflow
    mrcnn-train experiment=coco_r50_fpn_1x data.root=s3://bucket/coco trainer.num_workers=16
    mrcnn-train run_name=my-run                   # rerun the same name: resumes from its checkpoint
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import hydra
import ray
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mrcnn.checkpoint import load_weights_file
from workflows.config import CONF_DIR, register_configs, to_container
from workflows.model_io import log_model, register_model
from workflows.tracking import (
    check_tracking_server,
    mlflow_client,
    resolve_tracking_uri,
    start_or_resume_run,
    ui_command,
)
from workflows.trainer import TrainingData, build_trainer, init_ray, load_training_data, prepare

log = logging.getLogger(__name__)
register_configs()

# Keys of other jobs: not params of a training run.
OTHER_JOBS = ("sweep", "infer")


def training_params(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in OTHER_JOBS}


def log_data_report(client: MlflowClient, run_id: str, data: TrainingData) -> None:
    """What the annotation files' validation skipped or fixed, as a run artifact and counts
    (tags `data.train_problems`, `data.val_problems`)."""
    for split in (data.train, data.val):
        client.log_text(run_id, str(split.report) + "\n", f"data_report/{split.name}.txt")
    for split in (data.train, data.val):  # tags, not metrics: one number each, no chart to draw
        client.set_tag(run_id, f"data.{split.name}_problems", str(sum(split.report.counts.values())))


def finish_run(client: MlflowClient, run_id: str, result, registered_model: str | None,
               alias: str | None = "candidate") -> dict[str, Any]:
    """Log the final checkpoint as the run's model (and register it). Returns the checkpoint
    path and registry version."""
    out: dict[str, Any] = {"checkpoint": None, "version": None}
    if result.checkpoint is None:
        return out
    with result.checkpoint.as_directory() as d:
        payload = load_weights_file(Path(d) / "checkpoint.pt")
    log_model(client, run_id, payload)
    out["checkpoint"] = f"{result.checkpoint.path}/checkpoint.pt"
    if registered_model:
        out["version"] = register_model(client, run_id, registered_model, alias)
    return out


def report_unlogged(unlogged: list[str], run_id: str, folder: Path) -> None:
    """Name the MLflow writes the workers could not send (the server was away until the end),
    and keep the list beside the run's checkpoints."""
    if not unlogged:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlflow_unlogged.txt").write_text("\n".join(unlogged) + "\n")
    print(f"WARNING: {len(unlogged)} MLflow writes of run {run_id} could not be sent (the server was "
          f"unreachable); they are listed in {folder / 'mlflow_unlogged.txt'}, the first:")
    for what in unlogged[:5]:
        print(f"  {what}")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train; returns {run_id, tracking_uri, checkpoint (path), version, metrics}."""
    cfg = prepare(cfg)
    uri = resolve_tracking_uri(cfg["tracking"], cfg["output_dir"])
    check_tracking_server(uri)
    data = load_training_data(cfg)
    init_ray(cfg["ray_address"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    # A fresh name per job: two jobs started in the same second must not share (and resume) one run.
    cfg["run_name"] = cfg["run_name"] or time.strftime("mrcnn-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    run_id = start_or_resume_run(uri, cfg["tracking"]["experiment"], cfg["run_name"], training_params(cfg),
                                 tags={"job": "train"})
    log_data_report(mlflow_client(uri), run_id, data)
    trainer = build_trainer(training_params(cfg), data, run_id, uri,
                            storage_path=str(Path(cfg["output_dir"]) / "ray_results"), name=cfg["run_name"])
    result = trainer.fit()
    storage = Path(cfg["output_dir"]) / "ray_results" / cfg["run_name"]
    report_unlogged((result.metrics or {}).get("mlflow_unlogged") or [], run_id, storage)
    client = mlflow_client(uri)
    try:
        final = finish_run(client, run_id, result, cfg["tracking"]["registered_model"])
        client.set_terminated(run_id)
    except MlflowException as e:
        checkpoint = f"{result.checkpoint.path}/checkpoint.pt" if result.checkpoint else "none"
        raise ConnectionError(
            f"training finished but MLflow at {uri} failed while logging the model ({str(e)[:300]}); the final "
            f"checkpoint is {checkpoint} (`infer.model=` and `mrcnn-evaluate` take it as it is)"
        ) from None
    print(f"MLflow run {run_id} (experiment {cfg['tracking']['experiment']!r}) at {uri}")
    print(f"open the MLflow UI: {ui_command(uri, run_id)}")
    if final["version"]:
        print(f"registered {cfg['tracking']['registered_model']} version {final['version']} (alias candidate)")
    if final["checkpoint"]:
        print(f"final checkpoint: {final['checkpoint']}")
    return {"run_id": run_id, "tracking_uri": uri, "metrics": result.metrics, **final}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run(to_container(cfg))


if __name__ == "__main__":
    main()
