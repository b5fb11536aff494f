"""A generated COCO-format set of any size with detections to evaluate: COCOeval's workload
without a dataset download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

W, H, CATEGORIES = 640, 480, 80


def polygon(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> list[float]:
    """An ellipse-like polygon of 16 points inside the box."""
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    r = 0.35 + 0.15 * rng.random(16)
    xs = np.clip(x + w / 2 + np.cos(t) * w * r * 1.3, 0, W - 1)
    ys = np.clip(y + h / 2 + np.sin(t) * h * r * 1.3, 0, H - 1)
    return np.stack([xs, ys], 1).reshape(-1).round(2).tolist()


def generate_coco(images: int, instances: int, detections: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """(instances dict, COCO results): `images` of 640x480, `instances` polygons each of 80
    categories, `detections` results each with RLE masks (jittered copies of the ground truth,
    some with the wrong class, and random boxes)."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c + 1, "name": f"c{c + 1}"} for c in range(CATEGORIES)]
    gt: dict = {"images": [], "annotations": [], "categories": categories}
    results: list[dict] = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id:06d}.jpg"})
        boxes = []
        for _ in range(instances):
            w, h = rng.uniform(16, 320), rng.uniform(16, 240)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            cat = int(rng.integers(1, CATEGORIES + 1))
            poly = polygon(rng, x, y, w, h)
            rle = mask_utils.frPyObjects([poly], H, W)[0]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                      "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)),
                                      "segmentation": [poly], "iscrowd": 0})
            boxes.append((x, y, w, h, cat))
        for k in range(detections):
            if k < 3 * instances:  # jittered copies of the ground truth, some with the wrong class
                x, y, w, h, cat = boxes[k % instances]
                x, y = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
                if rng.random() < 0.2:
                    cat = int(rng.integers(1, CATEGORIES + 1))
            else:
                w, h = rng.uniform(8, 320), rng.uniform(8, 240)
                x, y, cat = rng.uniform(0, W - w), rng.uniform(0, H - h), int(rng.integers(1, CATEGORIES + 1))
            x, y = float(np.clip(x, 0, W - 2)), float(np.clip(y, 0, H - 2))
            w, h = float(min(w, W - x)), float(min(h, H - y))
            rle = mask_utils.frPyObjects([polygon(rng, x, y, w, h)], H, W)[0]
            results.append({"image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                            "score": float(rng.random()),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return gt, results


def its_own_ground_truth(model, src: Path, dst: Path) -> Path:
    """A copy of the shapes dataset whose val annotations are `model`'s predictions."""
    import json
    import shutil

    import torch

    from mrcnn.data.images import decode_image
    from mrcnn.masks import encode_masks

    shutil.copytree(src, dst)
    ann_path = dst / "annotations/instances_val.json"
    coco = json.loads(ann_path.read_text())
    categories = sorted(c["id"] for c in coco["categories"])
    anns = []
    for im in coco["images"]:
        pixels = decode_image((dst / im["file_name"]).read_bytes())
        with torch.no_grad():
            p = model([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
        for box, label, rle in zip(p["boxes"].tolist(), p["labels"].tolist(), encode_masks(p["masks"])):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": categories[label - 1],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle, "iscrowd": 0,
                         "area": (x2 - x1) * (y2 - y1)})
    assert anns, "the model predicts nothing: no ground truth to judge by"
    ann_path.write_text(json.dumps({**coco, "annotations": anns}))
    return dst
