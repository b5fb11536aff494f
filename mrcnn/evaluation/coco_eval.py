"""COCO evaluation (bbox + segm) of predictions against a COCO instances ground truth."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.data.coco import CategoryMap
from mrcnn.masks import encode_masks

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ground_truth(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO index from a parsed instances dict (no file round trip)."""
    gt = COCO()
    gt.dataset = copy.deepcopy(dataset)
    for i, ann in enumerate(gt.dataset.get("annotations", [])):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", i + 1)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def to_coco_results(
    image_id: int, prediction: dict[str, Any], categories: CategoryMap
) -> tuple[list[dict], list[dict]]:
    """One image's prediction -> (bbox results, segm results) in COCO's result format.

    prediction: `boxes` float[N, 4] (x1, y1, x2, y2), `labels` int64[N] (1..K), `scores`
    float[N], and `masks` bool[N, H, W] or `rles` (N compressed RLE dicts).
    """
    boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(prediction["labels"]).reshape(-1).tolist()
    scores = torch.as_tensor(prediction["scores"], dtype=torch.float32).reshape(-1).tolist()
    rles = prediction.get("rles")
    if rles is None and "masks" in prediction:
        rles = encode_masks(torch.as_tensor(prediction["masks"]))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    bbox, segm = [], []
    for i, (b, lab, s) in enumerate(zip(xywh, labels, scores)):
        cat = categories.category_id(int(lab))
        bbox.append({"image_id": int(image_id), "category_id": cat, "bbox": b, "score": float(s)})
        if rles is not None:
            segm.append({"image_id": int(image_id), "category_id": cat, "score": float(s),
                         "segmentation": {"size": list(rles[i]["size"]), "counts": rles[i]["counts"]}})
    return bbox, segm


def evaluate_coco(
    ground_truth: dict[str, Any] | COCO,
    results: dict[str, list[dict]],
    iou_types: tuple[str, ...] = ("bbox", "segm"),
    image_ids: list[int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """COCOeval per IoU type. results: {"bbox": [...], "segm": [...]} in COCO's result format.

    Returns {"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}} with values in [0, 1]
    (COCO's -1 for "no such objects" becomes NaN). Empty predictions give AP 0.
    """
    gt = ground_truth if isinstance(ground_truth, COCO) else coco_ground_truth(ground_truth)
    out = {}
    for iou_type in iou_types:
        dets = results.get(iou_type, [])
        if not dets:
            out[iou_type] = dict.fromkeys(METRICS, 0.0)
            continue
        dets = [dict(d) for d in dets]
        for d in dets:  # loadRes wants bytes counts
            if iou_type == "segm" and isinstance(d["segmentation"]["counts"], str):
                d["segmentation"] = {**d["segmentation"], "counts": d["segmentation"]["counts"].encode("ascii")}
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {m: (float(v) if v >= 0 else float("nan")) for m, v in zip(METRICS, ev.stats[:6])}
    return out


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    head = f"{'type':6s}" + "".join(f"{m:>8s}" for m in METRICS)
    rows = [f"{t:6s}" + "".join(f"{100 * v[m]:8.2f}" for m in METRICS) for t, v in metrics.items()]
    return "\n".join([head, *rows])


