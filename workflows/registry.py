"""Models: the URIs a user names them by, the logged models, loading, and the MLflow registry.

A run's final model is an MLflow 3 logged model of the pyfunc flavour, logged "from code"
(`workflows/mlflow_pyfunc.py`, with the `mrcnn` package as code), so MLflow's own tools load and
serve it. Its artifacts are three files, never a pickled module:

    weights.pt          state dict, read back with torch.load(weights_only=True)
    model_config.json   the resolved ModelConfig (our code rebuilds the model from it)
    label_map.json      {"category_ids": [...], "names": [...]} (label k <-> category_ids[k-1])

This project's jobs read those files themselves and never execute the logged code. Versions
registered before (the three files alone under a run's `model/`) load the same way.

A model is named by a checkpoint.pt path written by training, `runs:/RUN_ID/model`,
`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/m-ID` (`ModelURI.parse`).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

import mrcnn
from mrcnn.checkpoint import (
    MODEL_FILES,
    load_checkpoint,
    load_weights_file,
    read_model_files,
    remap_torchvision_keys,
    write_model_files,
)
from mrcnn.data.coco import CategoryMap
from workflows.storage import absolute, exists, is_s3, local_file
from workflows.tracking import fluent_api_at, metric_key, mlflow_client

ARTIFACT_PATH = "model"
# Registry aliases: training and sweeps register `candidate`; promotion moves `champion`.
CANDIDATE, CHAMPION = "candidate", "champion"
# The registered model name the sweep's best trial gets when tracking.registered_model is unset.
DEFAULT_MODEL_NAME = "maskrcnn"
# The metrics linked to a logged model: its run's evaluation (COCO AP and AR).
EVALUATION = "val/"


@dataclass(frozen=True)
class ModelURI:
    """What a user names a model by. kind: "registry" (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`), "logged" (`models:/m-ID`, an MLflow 3 logged model), "run"
    (`runs:/RUN_ID/PATH`) or "file" (a checkpoint.pt or torchvision weights path)."""

    uri: str
    kind: str
    model_id: str | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None  # the artifact path inside a run, or the file

    @classmethod
    def parse(cls, uri: str) -> ModelURI:
        if uri.startswith("models:/"):
            body = uri[len("models:/"):]
            if body.startswith("m-") and "/" not in body and "@" not in body:
                return cls(uri, "logged", model_id=body)
            if "@" in body:
                name, alias = body.split("@", 1)
                if name and alias and "/" not in name:
                    return cls(uri, "registry", name=name, alias=alias)
            else:
                name, _, version = body.partition("/")
                if name and version.isdigit():
                    return cls(uri, "registry", name=name, version=version)
            raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        if uri.startswith("runs:/"):
            run_id, _, sub = uri[len("runs:/"):].partition("/")
            if not run_id:
                raise ValueError(f"{uri}: expected runs:/RUN_ID/model")
            return cls(uri, "run", run_id=run_id, path=sub or ARTIFACT_PATH)
        if ("://" in uri and not is_s3(uri)) or uri.startswith(("models:", "runs:")):
            raise ValueError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                             "or a checkpoint.pt path or s3:// URI")
        return cls(uri, "file", path=uri)

    def pinned(self, version: str) -> str:
        """`models:/NAME/VERSION`: the same model even if the alias moves meanwhile."""
        return f"models:/{self.name}/{version}"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    labels: CategoryMap
    uri: str  # what the user named
    version: str | None = None  # the registry version a models:/ URI resolved to
    run_id: str | None = None  # the MLflow run that logged it, when known


PYFUNC_FILE = Path(__file__).with_name("mlflow_pyfunc.py")


def read_model_dir(folder: str | Path) -> tuple[torch.nn.Module, CategoryMap]:
    """A downloaded logged model (its files under `artifacts/`) or a model folder of the older
    layout (the files at its top) -> (model, labels); weights read with weights_only."""
    folder = Path(folder)
    if (folder / "artifacts" / MODEL_FILES[0]).is_file():
        folder = folder / "artifacts"
    model, label_map = read_model_files(folder)
    return model, CategoryMap.from_dict(label_map)


def _requirements() -> list[str]:
    from importlib.metadata import version

    import PIL
    import pycocotools  # noqa: F401 - installed with its version in the metadata
    import torchvision

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}", f"numpy=={np.__version__}",
            f"pillow=={PIL.__version__}", f"pandas=={pd.__version__}", f"pycocotools=={version('pycocotools')}"]


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    params = ParamSchema([ParamSpec("score_threshold", "double", 0.5), ParamSpec("max_detections", "long", 100)])
    return ModelSignature(inputs=inputs, params=params)


def _input_example() -> pd.DataFrame:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def log_model(tracking_uri: str, run_id: str, checkpoint: dict[str, Any], step: int | None = None) -> str:
    """Log a training checkpoint's weights, model config and label map as the run's logged
    model `model` (pyfunc from code, with a signature, an input example and pinned
    requirements), an output of the run at `step`. The run's evaluation metrics at `step` (its
    final evaluation) are linked to it, so MLflow ranks the experiment's models by them. Returns
    the logged model's id."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    step = step or 0
    with fluent_api_at(tracking_uri):
        # Created apart from the run: logged inside it, MLflow would link every metric the run has
        # at `step` (losses, lr, throughput) to the model, and the Models tab would show those first.
        model = mlflow.initialize_logged_model(name=ARTIFACT_PATH, source_run_id=run_id,
                                               experiment_id=run.info.experiment_id, params=run.data.params)
        with tempfile.TemporaryDirectory() as tmp:
            write_model_files(tmp, checkpoint["model"], checkpoint["model_config"], checkpoint["label_map"])
            artifacts = {"weights": f"{tmp}/weights.pt", "model_config": f"{tmp}/model_config.json",
                         "label_map": f"{tmp}/label_map.json"}
            mlflow.pyfunc.log_model(
                name=ARTIFACT_PATH, model_id=model.model_id, python_model=str(PYFUNC_FILE), artifacts=artifacts,
                code_paths=[str(Path(mrcnn.__file__).parent)], signature=_signature(),
                input_example=_input_example(), pip_requirements=_requirements())
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step)])
    # The same points, linked (as MLflow links a model's metrics): the run's history is unchanged.
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id)
              for key in run.data.metrics if key.startswith(EVALUATION)
              for m in client.get_metric_history(run_id, key) if m.step == step and m.model_id is None]
    if linked:
        client.log_batch(run_id, metrics=linked)
    return model.model_id


def run_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The newest logged model of a run (None: none, or a run of the older layout)."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    models = [m for m in models if m.name == ARTIFACT_PATH]
    return max(models, key=lambda m: m.creation_timestamp).model_id if models else None


def register_model(client: MlflowClient, run_id: str, name: str, alias: str | None = CANDIDATE) -> str:
    """A new version of `name` from the run's logged model (or its `model/` folder of the older
    layout), addressed by `alias`."""
    with contextlib.suppress(MlflowException):  # it may exist already
        client.create_registered_model(name)
    model_id = run_model_id(client, run_id)
    if model_id:
        # A SQLite registry reads the logged model through MLflow's global tracking URI.
        with fluent_api_at(client.tracking_uri):
            version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id)
        # As mlflow.register_model records it: the Models tab shows the versions of each model.
        versions = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [*versions, {"name": name, "version": version.version}])})
    else:
        source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
        version = client.create_model_version(name, source, run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def resolve_version(client: MlflowClient, uri: str | ModelURI, tracking_uri: str):
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the ModelVersion, with an error that
    says what exists when it does not."""
    ref = uri if isinstance(uri, ModelURI) else ModelURI.parse(uri)
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as e:
        try:
            versions = client.search_model_versions(f"name = '{ref.name}'")
            have = ", ".join(sorted(f"v{v.version}" for v in versions)) or "none"
            aliases = ", ".join(sorted(client.get_registered_model(ref.name).aliases)) or "none"
            hint = f"registered model {ref.name!r} has versions {have} and aliases {aliases}"
        except MlflowException:
            hint = f"there is no registered model {ref.name!r} in {tracking_uri}"
        raise ValueError(f"{ref.uri} does not exist: {hint} (see `mrcnn-models list {ref.name}`)") from e


def check_model(uri: str, tracking_uri: str, key: str) -> str:
    """Resolve a model before any Ray work: the registry version (to pin for every reader, even
    if the alias moves meanwhile), the logged model or run id, or the absolute file path.
    Raises naming the config `key`."""
    try:
        ref = ModelURI.parse(uri)
        if ref.kind == "registry":
            return str(resolve_version(mlflow_client(tracking_uri), ref, tracking_uri).version)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    client = mlflow_client(tracking_uri)
    if ref.kind == "logged":
        try:
            client.get_logged_model(ref.model_id)
        except MlflowException as e:
            raise ValueError(f"{key}: {uri} does not exist ({e.message})") from None
        return ref.model_id
    if ref.kind == "run":
        try:
            if ref.path == ARTIFACT_PATH and run_model_id(client, ref.run_id):
                return ref.run_id
            files = {f.path for f in client.list_artifacts(ref.run_id, ref.path)}
        except Exception as e:  # noqa: BLE001 - MlflowException or a store error for an unknown run
            raise ValueError(f"{key}: {uri} does not exist ({e})") from None
        if not any(f.endswith("weights.pt") for f in files):
            raise ValueError(f"{key}: {uri} holds no logged model (files: {sorted(files)})")
        return ref.run_id
    if exists(uri) != "file":
        raise FileNotFoundError(f"{key}: {uri} is not a file nor a models:/ or runs:/ URI")
    return absolute(uri)


def model_source(client: MlflowClient, ref: ModelURI, tracking_uri: str) -> tuple[str, str | None, str | None]:
    """Where a model URI's files are: (artifact URI to download, registry version, run id)."""
    if ref.kind == "registry":
        mv = resolve_version(client, ref, tracking_uri)
        return mv.source, str(mv.version), mv.run_id  # a logged model's models:/m-ID, or a run folder
    if ref.kind == "logged":
        return ref.uri, None, client.get_logged_model(ref.model_id).source_run_id
    model_id = run_model_id(client, ref.run_id) if ref.path == ARTIFACT_PATH else None
    return (f"models:/{model_id}" if model_id else f"runs:/{ref.run_id}/{ref.path}"), None, ref.run_id


def load_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Rebuild a model from a checkpoint path or a `runs:/` or `models:/` URI (weights_only
    load; the logged code is never executed)."""
    ref = ModelURI.parse(uri)
    if ref.kind == "file":
        with local_file(uri) as path:  # s3:// with the AWS environment's settings
            model, payload = load_checkpoint(path)
        if "label_map" not in payload:
            raise ValueError(f"{uri} has no label map; it was not written by mrcnn-train")
        return LoadedModel(model, CategoryMap.from_dict(payload["label_map"]), uri)
    client = mlflow_client(tracking_uri)
    source, version, run_id = model_source(client, ref, tracking_uri)
    if source.startswith("models:/"):  # read where this store keeps it: MLflow's own resolver
        source = client.get_logged_model(source[len("models:/"):]).artifact_location  # asks the default store
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(source, dst_path=tmp, tracking_uri=tracking_uri,
                                                         registry_uri=tracking_uri)
        except MlflowException as e:
            raise ValueError(f"{uri}: cannot download the model's files ({e.message})") from e
        model, labels = read_model_dir(folder)
    return LoadedModel(model, labels, uri, version, run_id)


def initial_weights(uri: str, tracking_uri: str) -> dict[str, torch.Tensor]:
    """The state dict training starts from (`trainer.init_weights`): any model `load_model`
    takes, a training checkpoint, or a torchvision Mask R-CNN state dict file (older key names
    remapped)."""
    ref = ModelURI.parse(uri)
    if ref.kind != "file":
        return load_model(uri, tracking_uri).model.state_dict()
    with local_file(uri) as path:
        payload = load_weights_file(path)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        return payload["model"]  # a checkpoint of mrcnn-train
    return remap_torchvision_keys(payload)


def list_versions(client: MlflowClient, name: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Every version of `name`: aliases, run and the run's final AP."""
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        raise ValueError(f"no registered model {name!r} at {tracking_uri}") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        rows.append({"version": str(mv.version), "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                     "run_id": mv.run_id, "segm_AP": metrics.get(metric_key("segm_AP")),
                     "bbox_AP": metrics.get(metric_key("bbox_AP"))})
    return rows
