"""COCO evaluation (bbox + segm) of predictions against a COCO instances ground truth.

Two implementations of the same COCOeval: pycocotools (the reference) and faster-coco-eval (its
C++ evaluation and accumulation, the default: the same summary numbers, held equal to
pycocotools' by a test, several times faster at COCO scale: `benchmarks/coco_eval.py`).
"""

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
BACKENDS = ("faster", "pycocotools")  # the first is the default


def _backend(name: str):
    """(COCO index class, COCOeval class) of a backend."""
    if name == "faster":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        return FasterCOCO, COCOeval_faster
    if name == "pycocotools":
        return COCO, COCOeval
    raise ValueError(f"unknown COCOeval backend {name!r}: one of {', '.join(BACKENDS)}")


def coco_ground_truth(dataset: dict[str, Any], backend: str = BACKENDS[0]):
    """The backend's COCO index of a parsed instances dict (no file round trip)."""
    index_class, _ = _backend(backend)
    gt = index_class()
    gt.dataset = copy.deepcopy(dataset)
    for i, ann in enumerate(gt.dataset.get("annotations", [])):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", i + 1)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _backend_of(index: Any) -> str:
    return "pycocotools" if isinstance(index, COCO) else "faster"


def evaluate_coco_stats(ground_truth: dict[str, Any] | Any, dets: list[dict], iou_type: str,
                        image_ids: list[int] | None = None, backend: str = BACKENDS[0]) -> list[float]:
    """COCOeval's 12 summary numbers (`stats`) of `dets` (COCO results, segmentation counts str
    or bytes) for one IoU type. `ground_truth`: a parsed instances dict, or a `coco_ground_truth`
    index (whose backend is then used)."""
    gt = coco_ground_truth(ground_truth, backend) if isinstance(ground_truth, dict) else ground_truth
    backend = _backend_of(gt)
    _, eval_class = _backend(backend)
    dets = [dict(d) for d in dets]
    for d in dets:  # pycocotools' loadRes wants bytes counts
        if iou_type == "segm" and isinstance(d["segmentation"]["counts"], str):
            d["segmentation"] = {**d["segmentation"], "counts": d["segmentation"]["counts"].encode("ascii")}
    dt = gt.loadRes(dets)
    ev = eval_class(gt, dt, iou_type)
    if image_ids is not None:
        ev.params.imgIds = list(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats[:12]]


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
    ground_truth: dict[str, Any] | Any,
    results: dict[str, list[dict]],
    iou_types: tuple[str, ...] = ("bbox", "segm"),
    image_ids: list[int] | None = None,
    verbose: bool = False,
    backend: str = BACKENDS[0],
) -> dict[str, dict[str, float]]:
    """COCOeval per IoU type. results: {"bbox": [...], "segm": [...]} in COCO's result format;
    `ground_truth` a parsed instances dict or a `coco_ground_truth` index.

    Returns {"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}} with values in [0, 1]
    (COCO's -1 for "no such objects" becomes NaN). Empty predictions give AP 0.
    """
    gt = coco_ground_truth(ground_truth, backend) if isinstance(ground_truth, dict) else ground_truth
    out = {}
    for iou_type in iou_types:
        dets = results.get(iou_type, [])
        if not dets:
            out[iou_type] = dict.fromkeys(METRICS, 0.0)
            continue
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            stats = evaluate_coco_stats(gt, dets, iou_type, image_ids)
        out[iou_type] = {m: (v if v >= 0 else float("nan")) for m, v in zip(METRICS, stats[:6])}
    return out


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    head = f"{'type':6s}" + "".join(f"{m:>8s}" for m in METRICS)
    rows = [f"{t:6s}" + "".join(f"{100 * v[m]:8.2f}" for m in METRICS) for t, v in metrics.items()]
    return "\n".join([head, *rows])


