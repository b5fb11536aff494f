"""`mrcnn-evaluate`: COCO evaluation (bbox + segm) of a checkpoint or a registered model, and the
evaluation `mrcnn-models promote` runs on each model it compares."""

from __future__ import annotations

import logging

import torch

from mrcnn.evaluation.coco_eval import format_table
from workflows.config import JobConfig, Paths, as_dict
from workflows.ingest import ensure_shapes, image_dataset, load_split
from workflows.jobs.frame import Job
from workflows.logged_model import LoadedModel, load_model
from workflows.registry import resolve_model
from workflows.runtime.allocator import reuse_large_blocks
from workflows.tracking import log_metrics
from workflows.training.steps import predict_to_coco

log = logging.getLogger(__name__)


def evaluate_model(loaded: LoadedModel, cfg: JobConfig, paths: Paths, split: str = "val") -> dict[str, float]:
    """COCOeval of a loaded model on `data.<split>` (Ray started) -> flat {bbox_AP, segm_AP,
    segm_AP50, ...}."""
    ensure_shapes(cfg.data, paths.data_root)
    data = load_split(cfg.data, paths.data_root, split, categories=loaded.labels)
    reuse_large_blocks()
    batches = image_dataset(data, cfg.data, train=False).iter_batches(batch_size=4, batch_format="numpy")
    preds = predict_to_coco(loaded.model.eval(), batches, loaded.labels, torch.device("cpu"))
    metrics = preds.evaluate(data.coco)
    print(f"{split}: {len(preds.image_ids)} images, model {loaded.uri}: " +
          " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("_AP", "AP50"))))
    return metrics


def run(cfg: JobConfig, weights: str, split: str = "val") -> dict[str, float]:
    """Evaluate `weights` (a checkpoint path or model URI) on `data.<split>`, recorded as an
    MLflow run."""
    with Job(cfg, "evaluate") as job:
        model = resolve_model(weights, job.tracking_uri, "weights")
        ensure_shapes(cfg.data, job.paths.data_root)
        load_split(cfg.data, job.paths.data_root, split)  # a wrong annotation file is named before any Ray work
        job.start_ray()
        loaded = load_model(model.uri, job.tracking_uri)
        tags = {"weights": weights, **({"model_version": model.version} if model.version else {})}
        run_id = job.open_run("evaluate", {"weights": weights, "split": split, "data": as_dict(cfg.data)}, tags=tags,
                              derived={"weights": model.uri})
        metrics = evaluate_model(loaded, cfg, job.paths, split)
        log.info("COCO evaluation of %s:\n%s", weights, format_table(
            {t: {m[len(t) + 1:]: v for m, v in metrics.items() if m.startswith(t + "_")} for t in ("bbox", "segm")}))
        log_metrics(job.client, run_id, metrics, 0)
        return metrics
