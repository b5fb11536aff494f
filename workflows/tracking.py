"""MLflow: one run per training job, logged from the driver and from rank 0 only."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient


def resolve_tracking_uri(tracking: dict[str, Any], output_dir: str) -> str:
    """Always absolute: a relative sqlite path would split across Ray workers' directories."""
    uri = tracking.get("tracking_uri")
    if uri:
        return uri
    db = (Path(output_dir) / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def start_or_resume_run(uri: str, experiment: str, run_name: str, cfg: dict[str, Any]) -> str:
    """The run tagged with this Ray run name (a rerun resumes it), or a new one. Returns its id."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp:
        exp_id = exp.experiment_id
    else:
        # With a SQLite store, artifacts live beside the database (not in ./mlruns of whatever
        # directory the job happened to start in); a server picks its own artifact root.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    found = client.search_runs([exp_id], filter_string=f"tags.ray_run_name = '{run_name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={"ray_run_name": run_name})
    run_id = run.info.run_id
    params = flatten(cfg)
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "config.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        client.log_artifact(run_id, str(p))
    return run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, step)
                                      for k, v in metrics.items() if v == v])  # NaN skipped


def log_model(client: MlflowClient, run_id: str, checkpoint: dict[str, Any], artifact_path: str = "model") -> None:
    """Weights (a state dict, read back with weights_only=True) + model config + label map."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / artifact_path
        d.mkdir()
        torch.save(checkpoint["model"], d / "weights.pt")
        (d / "model_config.json").write_text(json.dumps(checkpoint["model_config"], indent=2))
        (d / "label_map.json").write_text(json.dumps(checkpoint["label_map"], indent=2))
        client.log_artifacts(run_id, str(d), artifact_path)


def register_model(client: MlflowClient, run_id: str, name: str, alias: str = "candidate",
                   artifact_path: str = "model") -> str:
    """A new version of `name` from the run's logged model, addressed by `alias`."""
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # it may exist already
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
