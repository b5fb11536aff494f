"""MLflow runs: one per job (found again by its name tag on a rerun), logged from the driver and
from rank 0 only."""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from workflows.checks import tracking_store_error
from workflows.config import TrackingConfig

# Throughput and waiting: the UI's system/ section, beside MLflow's own system metrics.
SYSTEM_METRICS = ("images_per_s", "data_wait_s", "data_wait_share", "step_s")


_READY_STORES: set[str] = set()


@contextmanager
def fluent_api_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.pyfunc.log_model`, `mlflow.initialize_logged_model`) pointed
    at `uri` within the block. Setting it changes the process's URIs and exports them as
    MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI to every later subprocess and client: all of it
    is restored after, so a job run in a notebook (or a test) leaves no server behind it for
    the next one to reach."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    tracking, registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for a server)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def mlflow_client(uri: str) -> MlflowClient:
    """A client whose registry is the tracking server too (never a registry URI left in the
    environment by an earlier `mlflow.set_registry_uri`)."""
    db = sqlite_path(uri)
    if db is not None and uri not in _READY_STORES:
        _create_sqlite_store(uri, db)
    return MlflowClient(uri, registry_uri=uri)


def _create_sqlite_store(uri: str, db: Path) -> None:
    """Two jobs starting at once on a new SQLite store would both run its schema migrations, and
    one fails: the store is created under a file lock beside it, the other job waits."""
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)
    _READY_STORES.add(uri)


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


def ui_link(uri: str, run_id: str | None = None) -> str:
    """How to open the MLflow UI on this tracking store, at `run_id`'s page. The link names the
    model-training view: MLflow 3's UI opens every experiment in its GenAI view otherwise."""
    base = "http://127.0.0.1:5000" if uri.startswith("sqlite") else uri.rstrip("/")
    page = base
    if run_id:
        try:
            exp = mlflow_client(uri).get_run(run_id).info.experiment_id
            page = f"{base}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
        except mlflow.exceptions.MlflowException:
            pass
    return f"mlflow ui --backend-store-uri {uri}, then {page}" if uri.startswith("sqlite") else page


def resolve_tracking_uri(tracking: TrackingConfig, output_dir: str) -> str:
    """`tracking.tracking_uri`, else the SQLite file under `output_dir`: always absolute, since a
    relative sqlite path would split across Ray workers' directories."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    error = tracking_store_error(output_dir, tracking.tracking_uri)
    if error:
        raise ValueError(error)
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
        db = sqlite_path(uri)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        # The UI opens an experiment of this kind in its model-training view, not the GenAI one.
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location,
                                              tags={"mlflow.experimentKind": "custom_model_development"})
        except mlflow.exceptions.MlflowException:  # another job created it meanwhile
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    return exp_id


def run_exists(client: MlflowClient, experiment: str, run_name: str) -> bool:
    exp = client.get_experiment_by_name(experiment)
    return bool(exp and client.search_runs([exp.experiment_id], filter_string=f"tags.ray_run_name = '{run_name}'",
                                           max_results=1))


def start_or_resume_run(uri: str, experiment: str, run_name: str, config: dict[str, Any],
                        tags: dict[str, str] | None = None, derived: dict[str, Any] | None = None) -> str:
    """The run tagged with this run name (a rerun resumes it), or a new one recording `config`
    (the config as the user composed it) as params and config.yaml, and `derived` (what the job
    derived from it, by the key each completes) as `derived.` params and derived.yaml. Returns
    its id. `tags` go on a new run (e.g. the sweep's `mlflow.parentRunId`)."""
    client = mlflow_client(uri)
    exp_id = experiment_id(client, uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.ray_run_name = '{run_name}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={"ray_run_name": run_name, **(tags or {})})
    run_id = run.info.run_id
    derived = {k: v for k, v in (derived or {}).items() if v is not None}
    items = list({**flatten(config), **{f"derived.{k}": str(v)[:6000] for k, v in derived.items()}}.items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in (("config.yaml", config), ("derived.yaml", derived)):
            if content:
                p = Path(tmp) / name
                p.write_text(yaml.safe_dump(content, sort_keys=False))
                client.log_artifact(run_id, str(p))
    return run_id


def metric_key(name: str) -> str:
    """The MLflow name of a metric: a section prefix, so the UI groups its charts as val/ (COCO
    AP and AR), system/ (throughput, data wait) and train/ (losses, lr, progress). Names that
    already hold a section (`infer/...`, `sweep/...`) are kept."""
    if "/" in name:
        return name
    if name.startswith(("bbox_", "segm_")):
        return f"val/{name}"
    return f"system/{name}" if name in SYSTEM_METRICS else f"train/{name}"


def metric_entities(metrics: dict[str, float], step: int) -> list[mlflow.entities.Metric]:
    ts = int(time.time() * 1000)
    return [mlflow.entities.Metric(metric_key(k), float(v), ts, step)
            for k, v in metrics.items() if v == v]  # NaN skipped


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    client.log_batch(run_id, metrics=metric_entities(metrics, step))


@dataclass
class _Pending:
    what: str  # for the report: "train/loss@step 40", "image predictions/epoch_001/3.png"
    send: Any  # callable(client) -> None


class RunLogger:
    """Rank 0's MLflow writes, sent by a background thread so that a slow or absent server
    never stalls a training step. A write that fails stays queued and is retried every
    `retry_s`: a server that comes back gets the whole history, in order. `close` waits up to
    its timeout and returns what could not be sent, so the job can say so."""

    def __init__(self, uri: str, run_id: str, retry_s: float = 5.0):
        # Fail a request fast and retry here instead: MLflow's client would back off for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client, self.run_id, self.retry_s = mlflow_client(uri), run_id, retry_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._backlog: list[_Pending] = []  # touched by the thread only until it ends
        self._deadline = float("inf")
        self.failures, self.down = 0, False
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        entities = metric_entities(metrics, step)
        if entities:
            names = ",".join(m.key for m in entities)
            self._queue.put(_Pending(f"{names} @ step {step}",
                                     lambda c: c.log_batch(self.run_id, metrics=entities)))

    def log_image(self, image, artifact_file: str) -> None:
        self._queue.put(_Pending(f"image {artifact_file}",
                                 lambda c: c.log_image(self.run_id, image, artifact_file=artifact_file)))

    def set_tag(self, key: str, value: str) -> None:
        self._queue.put(_Pending(f"tag {key}", lambda c: c.set_tag(self.run_id, key, value)))

    def _run(self) -> None:
        stopping = False
        while True:
            try:  # wait for work; with a backlog, wake up to retry it
                items = [self._queue.get(timeout=self.retry_s if self._backlog else None)]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                items = []
            stopping = stopping or None in items
            self._backlog += [i for i in items if i is not None]
            self._send_backlog()
            if stopping and (not self._backlog or time.time() > self._deadline):
                return

    def _send_backlog(self) -> None:
        while self._backlog:
            try:
                self._backlog[0].send(self.client)
            except Exception as e:  # the server cannot be reached: keep it, retry later
                self.failures += 1
                if not self.down or self.failures % 20 == 0:
                    sys.stderr.write(f"MLflow unreachable ({str(e).splitlines()[0][:200]}); training goes on, "
                                     f"{len(self._backlog)} writes queued\n")
                self.down = True
                return
            self._backlog.pop(0)
        if self.down:
            sys.stderr.write("MLflow reachable again: the queued writes are sent\n")
            self.down = False

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to `timeout` s until everything queued so far is sent; at once False while the
        server is known to be down (training does not wait for it)."""
        if self.down:
            return False
        sent = threading.Event()
        self._queue.put(_Pending("", lambda c: sent.set()))
        return sent.wait(timeout)

    def close(self, timeout: float = 60.0) -> list[str]:
        """Send what is queued, retrying for up to `timeout` s; returns what could not be sent."""
        self._deadline = time.time() + timeout
        self._queue.put(None)
        self._thread.join(timeout + 30)
        return [p.what for p in list(self._backlog) if p.what]  # "": a flush marker
