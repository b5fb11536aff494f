"""The logged-model layout and loading a model from anywhere a user may name one.

A logged model is a folder of three files, never a pickled module:

    weights.pt          state dict, read back with torch.load(weights_only=True)
    model_config.json   the resolved ModelConfig (our code rebuilds the model from it)
    label_map.json      {"category_ids": [...], "names": [...]} (label k <-> category_ids[k-1])

`load_model` takes a checkpoint.pt written by training, `runs:/RUN_ID/model`,
`models:/NAME@ALIAS` or `models:/NAME/VERSION`.
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
from workflows.tracking import mlflow_client

ARTIFACT_PATH = "model"


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


def register_model(client: MlflowClient, run_id: str, name: str, alias: str | None = "candidate") -> str:
    """A new version of `name` from the run's logged model, addressed by `alias`."""
    with contextlib.suppress(MlflowException):  # it may exist already
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def resolve_version(client: MlflowClient, uri: str):
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the ModelVersion, with an error that
    says what exists when it does not."""
    body = uri[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = body.partition("/")
        if not version.isdigit():
            raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return client.get_model_version(name, version)
    except MlflowException as e:
        name = body.split("@")[0].split("/")[0]
        try:
            versions = client.search_model_versions(f"name = '{name}'")
            have = ", ".join(sorted(f"v{v.version}" for v in versions)) or "none"
            aliases = ", ".join(sorted(client.get_registered_model(name).aliases)) or "none"
            hint = f"registered model {name!r} has versions {have} and aliases {aliases}"
        except MlflowException:
            hint = f"there is no registered model {name!r} in {client._registry_uri}"
        raise ValueError(f"{uri} does not exist: {hint} (see `mrcnn-models list {name}`)") from e


def load_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """Rebuild a model from a checkpoint path, `runs:/`, or `models:/` URI (weights_only load)."""
    if not uri.startswith(("models:/", "runs:/")):
        model, payload = load_checkpoint(uri)
        if "label_map" not in payload:
            raise ValueError(f"{uri} has no label map; it was not written by mrcnn-train")
        return LoadedModel(model, CategoryMap.from_dict(payload["label_map"]), uri)
    import mlflow

    client = mlflow_client(tracking_uri)
    version, run_id, source = None, None, uri
    if uri.startswith("models:/"):
        mv = resolve_version(client, uri)
        version, run_id = str(mv.version), mv.run_id
        source = mv.source  # the logged model's artifact URI, read against this tracking server
    else:
        run_id = uri[len("runs:/"):].split("/")[0]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(source, dst_path=tmp, tracking_uri=tracking_uri,
                                                         registry_uri=tracking_uri)
        except MlflowException as e:
            raise ValueError(f"{uri}: cannot download the model's files ({e.message})") from e
        model, labels = read_model_dir(folder)
    return LoadedModel(model, labels, uri, version, run_id)
