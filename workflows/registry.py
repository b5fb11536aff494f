"""The MLflow model registry and the URIs a user names models by (no torch: `mrcnn-models list`
and `alias` answer without loading the model's code).

A model is named by a checkpoint.pt path written by training, `runs:/RUN_ID/model`,
`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/m-ID` (`ModelURI.parse`); a job
resolves it once, before any Ray work (`resolve_model`), and every reader loads the result.
Logging and loading the model's files: `workflows.logged_model`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from workflows.storage import absolute, exists, is_s3
from workflows.tracking import fluent_api_at, metric_key, mlflow_client

ARTIFACT_PATH = "model"
# Registry aliases: training and sweeps register `candidate`; promotion moves `champion`.
CANDIDATE, CHAMPION = "candidate", "champion"
# The registered model name the sweep's best trial gets when tracking.registered_model is unset.
DEFAULT_MODEL_NAME = "maskrcnn"


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


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI checked before any Ray work."""

    given: str  # as the user wrote it
    uri: str  # what every reader loads: an alias pinned to its version (even if the alias moves), a file absolute
    version: str | None = None  # the registry version, for a registered model
    name: str | None = None  # the registered model's name, for a registered model

    @property
    def registered(self) -> str | None:
        """`NAME/VERSION` of a registered model (None for any other)."""
        return f"{self.name}/{self.version}" if self.version else None


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


def resolve_model(uri: str, tracking_uri: str, key: str) -> ResolvedModel:
    """Check that the model `uri` exists and resolve it: a registry alias to its version, a file
    to its absolute path. Raises naming the config `key`."""
    try:
        ref = ModelURI.parse(uri)
        if ref.kind == "registry":
            version = str(resolve_version(mlflow_client(tracking_uri), ref, tracking_uri).version)
            return ResolvedModel(uri, ref.pinned(version), version, ref.name)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    client = mlflow_client(tracking_uri)
    if ref.kind == "logged":
        try:
            client.get_logged_model(ref.model_id)
        except MlflowException as e:
            raise ValueError(f"{key}: {uri} does not exist ({e.message})") from None
        return ResolvedModel(uri, uri)
    if ref.kind == "run":
        try:
            if ref.path == ARTIFACT_PATH and run_model_id(client, ref.run_id):
                return ResolvedModel(uri, uri)
            files = {f.path for f in client.list_artifacts(ref.run_id, ref.path)}
        except Exception as e:  # noqa: BLE001 - MlflowException or a store error for an unknown run
            raise ValueError(f"{key}: {uri} does not exist ({e})") from None
        if not any(f.endswith("weights.pt") for f in files):
            raise ValueError(f"{key}: {uri} holds no logged model (files: {sorted(files)})")
        return ResolvedModel(uri, uri)
    if exists(uri) != "file":
        raise FileNotFoundError(f"{key}: {uri} is not a file nor a models:/ or runs:/ URI")
    return ResolvedModel(uri, absolute(uri))


def model_source(client: MlflowClient, ref: ModelURI, tracking_uri: str) -> tuple[str, str | None, str | None]:
    """Where a model URI's files are: (artifact URI to download, registry version, run id)."""
    if ref.kind == "registry":
        mv = resolve_version(client, ref, tracking_uri)
        return mv.source, str(mv.version), mv.run_id  # a logged model's models:/m-ID, or a run folder
    if ref.kind == "logged":
        return ref.uri, None, client.get_logged_model(ref.model_id).source_run_id
    model_id = run_model_id(client, ref.run_id) if ref.path == ARTIFACT_PATH else None
    return (f"models:/{model_id}" if model_id else f"runs:/{ref.run_id}/{ref.path}"), None, ref.run_id


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
