"""The MLflow pyfunc of a logged Mask R-CNN, logged "from code": MLflow stores this file with the
model and executes it when `mlflow.pyfunc.load_model` or `mlflow models serve` loads the model.
It imports only `mrcnn` (logged beside it as code) and rebuilds the model from the logged files:
weights read with `torch.load(weights_only=True)`, config and label map from JSON. Nothing is
unpickled.

predict(DataFrame) -> DataFrame, one row per input row:
    input   `image`: encoded image bytes (JPEG, PNG, ...; base64 in a JSON request to the
            scoring server), or `path`: a local path to an image file
    params  `score_threshold` (0.5), `max_detections` (100), `precision` (the one the model was
            trained in, recorded in its signature: fp32, bf16 or fp16; a recorded one this device
            cannot run falls back to fp32 with a warning, a requested one is an error)
    output  `width`, `height`, `boxes`, `scores`, `labels` (category ids), `category_names`,
            `masks` (COCO RLE: {"size": [H, W], "counts": str}), `error` (None when fine)
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_PARAMS = {"score_threshold": 0.5, "max_detections": 100}


class MaskRCNNModel(PythonModel):
    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        import torch

        from mrcnn.checkpoint import build_from_state, load_weights_file
        from mrcnn.data.coco import CategoryMap

        files = context.artifacts
        config = json.loads(Path(files["model_config"]).read_text())
        self.model = build_from_state(config, load_weights_file(files["weights"])).eval()
        self.labels = CategoryMap.from_dict(json.loads(Path(files["label_map"]).read_text()))
        self.device = torch.device("cpu")
        # The precision the model was trained in, recorded when it was logged.
        self.default_precision = (getattr(context, "model_config", None) or {}).get("precision", "fp32")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mrcnn.precision import unsupported
        from mrcnn.segment import ROW_FIELDS, segment_encoded

        params = {**DEFAULT_PARAMS, "precision": self.default_precision, **(params or {})}
        self.model.set_detection_limits(params["score_threshold"], params["max_detections"])
        precision = params["precision"]
        why = unsupported(precision, self.device)
        if why and precision != self.default_precision:
            raise ValueError(f"params precision={precision}: {why}")
        if why:
            import warnings

            warnings.warn(f"the model's precision {precision} cannot run here ({why}): fp32 instead", stacklevel=2)
            precision = "fp32"
        self.model.set_precision(precision)  # boxes, scores and masks come out fp32 in any precision
        items = [_image_bytes(model_input, i) for i in range(len(model_input))]
        rows = segment_encoded(self.model, items, self.labels, self.device)
        return pd.DataFrame(rows, columns=list(ROW_FIELDS), dtype=object)


def _image_bytes(frame: pd.DataFrame, i: int) -> tuple[bytes | None, str]:
    """Row i's encoded image and a name for messages: the `image` column's bytes, else the file
    the `path` column names (a file that cannot be read gives None: an error row)."""
    if "image" in frame.columns and isinstance(frame["image"].iloc[i], (bytes, bytearray)):
        return bytes(frame["image"].iloc[i]), f"row {i}"
    if "path" in frame.columns and isinstance(frame["path"].iloc[i], str):
        path = frame["path"].iloc[i]
        try:
            with open(path, "rb") as f:
                return f.read(), path
        except OSError as e:
            return None, f"{path} ({e.strerror or e})"
    return None, f"row {i} (neither an `image` nor a `path` value)"


mlflow.models.set_model(MaskRCNNModel())
