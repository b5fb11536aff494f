"""`mrcnn-evaluate`: COCO evaluation (bbox + segm) of a checkpoint or a registered model.

    mrcnn-evaluate +weights=outputs/ray_results/RUN/checkpoint_.../checkpoint.pt
    mrcnn-evaluate +weights=models:/maskrcnn@champion data=coco data.root=/data/coco +split=val
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import hydra
import ray
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mrcnn import build_model
from mrcnn.checkpoint import load_checkpoint
from mrcnn.data.coco import CategoryMap
from mrcnn.evaluation.coco_eval import evaluate_coco, format_table, to_coco_results
from mrcnn.masks import encode_masks
from workflows.config import CONF_DIR, register_configs, to_container
from workflows.data import batch_to_model_inputs, ensure_shapes, image_dataset, load_split
from workflows.tracking import log_metrics, resolve_tracking_uri, start_or_resume_run

register_configs()


def load_model(weights: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, CategoryMap]:
    """A checkpoint.pt written by training, or a logged / registered MLflow model
    (`models:/name@alias`, `runs:/id/model`): weights + config + label map, no pickles."""
    if weights.startswith(("models:/", "runs:/")):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(mlflow.artifacts.download_artifacts(weights, dst_path=tmp))
            cfg = json.loads((d / "model_config.json").read_text())
            labels = CategoryMap.from_dict(json.loads((d / "label_map.json").read_text()))
            cfg["backbone"]["pretrained_path"] = None
            model = build_model(cfg)
            model.load_state_dict(torch.load(d / "weights.pt", map_location="cpu", weights_only=True))
        return model, labels
    model, payload = load_checkpoint(weights)
    if "label_map" not in payload:
        raise ValueError(f"{weights} has no label map; it was not written by mrcnn-train")
    return model, CategoryMap.from_dict(payload["label_map"])


@torch.no_grad()
def evaluate(cfg: dict[str, Any], weights: str, split: str = "val") -> dict[str, dict[str, float]]:
    uri = resolve_tracking_uri(cfg["tracking"], cfg["output_dir"])
    model, labels = load_model(weights, uri)
    model.eval()
    ensure_shapes(cfg["data"])
    data = load_split(cfg["data"], split, categories=labels)
    if not ray.is_initialized():
        ray.init(address=cfg["ray_address"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, list] = {"bbox": [], "segm": []}
    ids = []
    for batch in image_dataset(data, cfg["data"], train=False).iter_batches(batch_size=4, batch_format="numpy"):
        images, _, image_ids = batch_to_model_inputs(batch)
        for image_id, pred in zip(image_ids, model(images)):
            b, s = to_coco_results(image_id, {**pred, "rles": encode_masks(pred["masks"])}, labels)
            results["bbox"] += b
            results["segm"] += s
            ids.append(image_id)
    metrics = evaluate_coco(data.coco, results, image_ids=sorted(ids))
    print(f"{split}: {len(ids)} images, weights {weights}")
    print(format_table(metrics))
    client = MlflowClient(uri)
    run_id = start_or_resume_run(uri, cfg["tracking"]["experiment"], f"evaluate-{Path(weights).name}-{split}",
                                 {"weights": weights, "split": split, "data": cfg["data"]})
    log_metrics(client, run_id, {f"{t}_{m}": v for t, ms in metrics.items() for m, v in ms.items()}, 0)
    client.set_terminated(run_id)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    weights = cfg.get("weights")
    if not weights:
        raise SystemExit("mrcnn-evaluate needs +weights=PATH/checkpoint.pt or +weights=models:/NAME@ALIAS")
    split = cfg.get("split", "val")
    plain = to_container(cfg)
    plain.pop("weights", None)
    plain.pop("split", None)
    evaluate(plain, weights, split)


if __name__ == "__main__":
    main()
