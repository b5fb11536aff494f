"""MLflow runs: one per job (found again by its name tag on a rerun), logged from the driver and
from rank 0 only."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient


def mlflow_client(uri: str) -> MlflowClient:
    """A client whose registry is the tracking server too (never a registry URI left in the
    environment by an earlier `mlflow.set_registry_uri`)."""
    return MlflowClient(uri, registry_uri=uri)


def check_tracking_server(uri: str, timeout: float = 10) -> None:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer (MLflow's own
    client would retry for minutes, after the job had started)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # behind authentication: it answers
            return
        raise ConnectionError(f"tracking.tracking_uri={uri}: the MLflow server answered {e.code} on /health; "
                              "check the URI") from None
    except OSError as e:
        raise ConnectionError(f"tracking.tracking_uri={uri}: no MLflow server answers there ({e}); start it "
                              "(mlflow server --host 127.0.0.1 --port 5000) or fix the URI") from None


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on this tracking store."""
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri


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


def experiment_id(client: MlflowClient, uri: str, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp:
        exp_id = exp.experiment_id
    else:
        # With a SQLite store, artifacts live beside the database (not in ./mlruns of whatever
        # directory the job happened to start in); a server picks its own artifact root.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        # The UI opens an experiment of this kind in its model-training view, not the GenAI one.
        exp_id = client.create_experiment(experiment, artifact_location=location,
                                          tags={"mlflow.experimentKind": "custom_model_development"})
    return exp_id


def start_or_resume_run(uri: str, experiment: str, run_name: str, cfg: dict[str, Any],
                        tags: dict[str, str] | None = None) -> str:
    """The run tagged with this run name (a rerun resumes it), or a new one with `cfg` logged
    as params and config.yaml. Returns its id. `tags` go on a new run (e.g. the sweep's
    `mlflow.parentRunId`)."""
    client = mlflow_client(uri)
    exp_id = experiment_id(client, uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.ray_run_name = '{run_name}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={"ray_run_name": run_name, **(tags or {})})
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
