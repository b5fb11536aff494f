"""The evaluation job: COCO evaluation (bbox + segm) of a checkpoint or a registered model
(`mrcnn-evaluate`), and the evaluation `promote` runs on each model it compares."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mrcnn.evaluation.coco_eval import format_table
from workflows.allocator import reuse_large_blocks
from workflows.engine import predict_to_coco
from workflows.ingest import ensure_shapes, image_dataset, load_split
from workflows.job import Job
from workflows.registry import LoadedModel, check_model, load_model
from workflows.tracking import log_metrics

log = logging.getLogger(__name__)


def evaluate_model(loaded: LoadedModel, cfg: dict[str, Any], split: str = "val") -> dict[str, float]:
    """COCOeval of a loaded model on `data.<split>` (Ray started) -> flat {bbox_AP, segm_AP,
    segm_AP50, ...}."""
    ensure_shapes(cfg["data"])
    data = load_split(cfg["data"], split, categories=loaded.labels)
    reuse_large_blocks()
    batches = image_dataset(data, cfg["data"], train=False).iter_batches(batch_size=4, batch_format="numpy")
    preds = predict_to_coco(loaded.model.eval(), batches, loaded.labels, torch.device("cpu"))
    metrics = preds.evaluate(data.coco)
    print(f"{split}: {len(preds.image_ids)} images, model {loaded.uri}: " +
          " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("_AP", "AP50"))))
    return metrics


def run(cfg: dict[str, Any], weights: str, split: str = "val") -> dict[str, float]:
    """Evaluate `weights` (a checkpoint path or model URI) on `data.<split>`, recorded as an
    MLflow run."""
    with Job(cfg, "evaluate") as job:
        cfg = job.cfg
        check_model(weights, job.tracking_uri, "weights")
        ensure_shapes(cfg["data"])
        load_split(cfg["data"], split)  # the annotation file is named before any Ray work if it is wrong
        job.start_ray()
        loaded = load_model(weights, job.tracking_uri)
        tags = {"weights": weights, **({"model_version": loaded.version} if loaded.version else {})}
        run_id = job.open_run("evaluate", {"weights": weights, "split": split, "data": cfg["data"]}, tags=tags)
        metrics = evaluate_model(loaded, cfg, split)
        log.info("COCO evaluation of %s:\n%s", weights, format_table(
            {t: {m[len(t) + 1:]: v for m, v in metrics.items() if m.startswith(t + "_")} for t in ("bbox", "segm")}))
        log_metrics(job.client, run_id, metrics, 0)
        return metrics

