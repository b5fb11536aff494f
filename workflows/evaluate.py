"""`mrcnn-evaluate`: COCO evaluation (bbox + segm) of a checkpoint or a registered model.

    mrcnn-evaluate +weights=outputs/ray_results/RUN/checkpoint_.../checkpoint.pt
    mrcnn-evaluate +weights=models:/maskrcnn@champion data=coco data.root=/data/coco +split=val
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import ray
import torch
from omegaconf import DictConfig

from mrcnn.evaluation.coco_eval import format_table
from workflows.allocator import reuse_large_blocks
from workflows.config import CONF_DIR, register_configs, to_container
from workflows.data import ensure_shapes, image_dataset, load_split
from workflows.engine import predict_to_coco
from workflows.model_io import LoadedModel, load_model
from workflows.tracking import (
    log_metrics,
    mlflow_client,
    resolve_tracking_uri,
    start_or_resume_run,
    ui_command,
)

register_configs()


def evaluate_model(loaded: LoadedModel, cfg: dict[str, Any], split: str = "val") -> dict[str, float]:
    """COCOeval of a loaded model on `data.<split>` -> flat {bbox_AP, segm_AP, segm_AP50, ...}."""
    ensure_shapes(cfg["data"])
    data = load_split(cfg["data"], split, categories=loaded.labels)
    if not ray.is_initialized():
        ray.init(address=cfg["ray_address"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    reuse_large_blocks()
    batches = image_dataset(data, cfg["data"], train=False).iter_batches(batch_size=4, batch_format="numpy")
    preds = predict_to_coco(loaded.model.eval(), batches, loaded.labels, torch.device("cpu"))
    print(f"{split}: {len(preds.image_ids)} images, model {loaded.uri}")
    return preds.evaluate(data.coco)


def evaluate(cfg: dict[str, Any], weights: str, split: str = "val") -> dict[str, float]:
    """Evaluate and record the result as an MLflow run named after the weights and split."""
    uri = resolve_tracking_uri(cfg["tracking"], cfg["output_dir"])
    metrics = evaluate_model(load_model(weights, uri), cfg, split)
    print(format_table({t: {m[len(t) + 1:]: v for m, v in metrics.items() if m.startswith(t + "_")}
                        for t in ("bbox", "segm")}))
    client = mlflow_client(uri)
    run_id = start_or_resume_run(uri, cfg["tracking"]["experiment"], f"evaluate-{Path(weights).name}-{split}",
                                 {"weights": weights, "split": split, "data": cfg["data"]})
    log_metrics(client, run_id, metrics, 0)
    client.set_terminated(run_id)
    print(f"MLflow run {run_id} at {uri}; open the UI: {ui_command(uri, run_id)}")
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
