"""A logged model's files: logging a training checkpoint as an MLflow 3 logged model, and loading
any model URI back into our Mask R-CNN.

A run's final model is an MLflow 3 logged model of the pyfunc flavour, logged "from code"
(`workflows/mlflow_pyfunc.py`, with the `mrcnn` package as code), so MLflow's own tools load and
serve it. Its artifacts are three files, never a pickled module:

    weights.pt          state dict, read back with torch.load(weights_only=True)
    model_config.json   the resolved ModelConfig (our code rebuilds the model from it)
    label_map.json      {"category_ids": [...], "names": [...]} (label k <-> category_ids[k-1])

This project's jobs read those files themselves and never execute the logged code. Versions
registered before (the three files alone under a run's `model/`) load the same way.
"""

from __future__ import annotations

import io
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
from workflows.registry import ARTIFACT_PATH, ModelURI, model_source
from workflows.storage import S3Config, join, local_file
from workflows.tracking import fluent_api_at, mlflow_client

# The metrics linked to a logged model: its run's evaluation (COCO AP and AR).
EVALUATION = "val/"


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


def _signature(precision: str):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    params = ParamSchema([ParamSpec("score_threshold", "double", 0.5), ParamSpec("max_detections", "long", 100),
                          ParamSpec("precision", "string", precision)])
    return ModelSignature(inputs=inputs, params=params)


def trained_precision(checkpoint: dict[str, Any]) -> str:
    """The precision a checkpoint was trained in (`trainer.precision`; fp32 before it existed):
    its logged model's default at predict time."""
    return ((checkpoint.get("config") or {}).get("trainer") or {}).get("precision") or "fp32"


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
    precision = trained_precision(checkpoint)  # the pyfunc's default at predict time
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
                code_paths=[str(Path(mrcnn.__file__).parent)], signature=_signature(precision),
                model_config={"precision": precision},
                input_example=_input_example(), pip_requirements=_requirements())
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step)])
    # The same points, linked (as MLflow links a model's metrics): the run's history is unchanged.
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id)
              for key in run.data.metrics if key.startswith(EVALUATION)
              for m in client.get_metric_history(run_id, key) if m.step == step and m.model_id is None]
    if linked:
        client.log_batch(run_id, metrics=linked)
    return model.model_id


def log_checkpoint(tracking_uri: str, run_id: str, checkpoint_dir: str, s3: S3Config | None = None) -> str:
    """A training checkpoint (`checkpoint_dir`/checkpoint.pt, a path or s3:// URI) as the run's
    logged model, linked to the evaluation of the same step. Returns the logged model's id."""
    with local_file(join(checkpoint_dir, "checkpoint.pt"), s3) as path:
        payload = load_weights_file(path)
    return log_model(tracking_uri, run_id, payload, step=payload.get("step"))


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


