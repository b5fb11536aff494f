"""`mrcnn-evaluate`: COCO evaluation (bbox + segm) of a checkpoint or a registered model, its
predictions made on the cluster's predictor actors (`workflows.inference.evaluation`); the
evaluation `mrcnn-models promote` runs on the models it compares."""

from __future__ import annotations

import logging

from mrcnn.evaluation.coco_eval import format_table
from workflows.config import JobConfig, Paths, as_dict
from workflows.inference.evaluation import predict_split
from workflows.ingest import Split, ensure_shapes, load_split
from workflows.jobs.frame import Job
from workflows.registry import ResolvedModel, resolve_model
from workflows.tracking import log_metrics

log = logging.getLogger(__name__)


def read_split(cfg: JobConfig, paths: Paths, split: str) -> Split:
    """`data.<split>` read and checked on the driver, before any Ray work (a wrong annotation
    file is named then)."""
    ensure_shapes(cfg.data, paths.data_root)
    return load_split(cfg.data, paths.data_root, split)


def evaluate_models(models: list[ResolvedModel], cfg: JobConfig, data: Split, tracking_uri: str
                    ) -> tuple[list[dict[str, float]], set[str]]:
    """COCOeval of each model on `data` (Ray started), predicted in one pass on the predictor
    actors -> (flat {bbox_AP, segm_AP, segm_AP50, ...} per model, the nodes that predicted)."""
    predicted = predict_split(data, models, cfg.infer, tracking_uri, cfg.data.s3)
    scores = []
    for model, results in zip(models, predicted.results):
        metrics = results.evaluate(data.coco)
        print(f"{data.name}: {len(results.image_ids)} images, model {model.given}: " +
              " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("_AP", "AP50"))))
        log.info("COCO evaluation of %s:\n%s", model.given, format_table(
            {t: {m[len(t) + 1:]: v for m, v in metrics.items() if m.startswith(t + "_")} for t in ("bbox", "segm")}))
        scores.append(metrics)
    if predicted.errors:
        print(f"WARNING: {len(predicted.errors)} images left out (unreadable): {predicted.errors[0]}")
    return scores, predicted.nodes


def run(cfg: JobConfig, weights: str, split: str = "val") -> dict[str, float]:
    """Evaluate `weights` (a checkpoint path or model URI) on `data.<split>`, recorded as an
    MLflow run."""
    with Job(cfg, "evaluate") as job:
        model = resolve_model(weights, job.tracking_uri, "weights")
        data = read_split(cfg, job.paths, split)
        job.start_ray()
        tags = {"weights": weights, **({"model_version": model.version} if model.version else {})}
        run_id = job.open_run("evaluate", {"weights": weights, "split": split, "data": as_dict(cfg.data),
                                           "infer": as_dict(cfg.infer)}, tags=tags, derived={"weights": model.uri})
        (metrics,), nodes = evaluate_models([model], cfg, data, job.tracking_uri)
        log_metrics(job.client, run_id, metrics, 0)
        job.client.set_tag(run_id, "ray.predictor_nodes", ",".join(sorted(nodes)))
        return metrics
