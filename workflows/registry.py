"""Models: the URIs a user names them by, the logged-model files, loading, logging and the
MLflow model registry.

A logged model is a folder of three files, never a pickled module:

    weights.pt          state dict, read back with torch.load(weights_only=True)
    model_config.json   the resolved ModelConfig (our code rebuilds the model from it)
    label_map.json      {"category_ids": [...], "names": [...]} (label k <-> category_ids[k-1])

A model is named by a checkpoint.pt path written by training, `runs:/RUN_ID/model`,
`models:/NAME@ALIAS` or `models:/NAME/VERSION` (`ModelURI.parse`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mrcnn.checkpoint import build_from_state, load_checkpoint, load_weights_file
from mrcnn.data.coco import CategoryMap
from workflows.tracking import metric_key, mlflow_client

ARTIFACT_PATH = "model"
# Registry aliases: training and sweeps register `candidate`; promotion moves `champion`.
CANDIDATE, CHAMPION = "candidate", "champion"
# The registered model name the sweep's best trial gets when tracking.registered_model is unset.
DEFAULT_MODEL_NAME = "maskrcnn"


@dataclass(frozen=True)
class ModelURI:
    """What a user names a model by. kind: "registry" (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`), "run" (`runs:/RUN_ID/PATH`) or "file" (a checkpoint.pt path)."""

    uri: str
    kind: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None  # the artifact path inside a run, or the file

    @classmethod
    def parse(cls, uri: str) -> ModelURI:
        if uri.startswith("models:/"):
            body = uri[len("models:/"):]
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
        if "://" in uri or uri.startswith(("models:", "runs:")):
            raise ValueError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                             "or a checkpoint.pt path")
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


def write_model_dir(folder: str | Path, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                    label_map: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "weights.pt")
    (folder / "model_config.json").write_text(json.dumps(model_config, indent=2))
    (folder / "label_map.json").write_text(json.dumps(label_map, indent=2))
    return folder


def read_model_dir(folder: str | Path) -> tuple[torch.nn.Module, CategoryMap]:
    folder = Path(folder)
    for name in ("weights.pt", "model_config.json", "label_map.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a logged mrcnn model: {name} is missing")
    cfg = json.loads((folder / "model_config.json").read_text())
    model = build_from_state(cfg, load_weights_file(folder / "weights.pt"))
    return model, CategoryMap.from_dict(json.loads((folder / "label_map.json").read_text()))


def log_model(client: MlflowClient, run_id: str, checkpoint: dict[str, Any]) -> None:
    """Log a training checkpoint's weights, model config and label map as the run's `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        d = write_model_dir(Path(tmp) / ARTIFACT_PATH, checkpoint["model"], checkpoint["model_config"],
                            checkpoint["label_map"])
        client.log_artifacts(run_id, str(d), ARTIFACT_PATH)


def register_model(client: MlflowClient, run_id: str, name: str, alias: str | None = CANDIDATE) -> str:
    """A new version of `name` from the run's logged model, addressed by `alias`."""
    with contextlib.suppress(MlflowException):  # it may exist already
        client.create_registered_model(name)
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
    if the alias moves meanwhile), the run id, or the absolute checkpoint path. Raises naming
    the config `key`."""
    try:
        ref = ModelURI.parse(uri)
        if ref.kind == "registry":
            return str(resolve_version(mlflow_client(tracking_uri), ref, tracking_uri).version)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if ref.kind == "run":
        try:
            files = {f.path for f in mlflow_client(tracking_uri).list_artifacts(ref.run_id, ref.path)}
        except Exception as e:  # noqa: BLE001 - MlflowException or a store error for an unknown run
            raise ValueError(f"{key}: {uri} does not exist ({e})") from None
        if not any(f.endswith("weights.pt") for f in files):
            raise ValueError(f"{key}: {uri} holds no weights.pt (files: {sorted(files)})")
        return ref.run_id
    if not Path(uri).is_file():
        raise FileNotFoundError(f"{key}: {uri} is not a file nor a models:/ or runs:/ URI")
    return str(Path(uri).resolve())


def load_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Rebuild a model from a checkpoint path, `runs:/`, or `models:/` URI (weights_only load)."""
    ref = ModelURI.parse(uri)
    if ref.kind == "file":
        model, payload = load_checkpoint(uri)
        if "label_map" not in payload:
            raise ValueError(f"{uri} has no label map; it was not written by mrcnn-train")
        return LoadedModel(model, CategoryMap.from_dict(payload["label_map"]), uri)
    import mlflow

    client = mlflow_client(tracking_uri)
    version, run_id, source = None, ref.run_id, uri
    if ref.kind == "registry":
        mv = resolve_version(client, ref, tracking_uri)
        version, run_id = str(mv.version), mv.run_id
        source = mv.source  # the logged model's artifact URI, read against this tracking server
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(source, dst_path=tmp, tracking_uri=tracking_uri,
                                                         registry_uri=tracking_uri)
        except MlflowException as e:
            raise ValueError(f"{uri}: cannot download the model's files ({e.message})") from e
        model, labels = read_model_dir(folder)
    return LoadedModel(model, labels, uri, version, run_id)


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
