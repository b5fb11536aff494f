"""A synthetic COCO-format instance segmentation dataset of circles, squares and triangles.

Real JPEG files plus `annotations/instances_{train,val}.json`. Later shapes occlude earlier
ones (their masks lose the covered pixels); unoccluded squares and triangles are written as
polygons, everything else as compressed RLE. The same seed gives the same files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mrcnn.masks import encode_masks

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
MIN_VISIBLE_PIXELS = 30


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    n = 4 if kind == "square" else 3
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = (a * (1 - t) + b * t) * np.ones((1, size, 1))
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8))


def render_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict]]:
    """One image and its instances: [{category_id, mask bool[H, W], polygon or None}]."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    instances: list[dict] = []
    for _ in range(int(rng.integers(2, 6))):
        cat = CATEGORIES[int(rng.integers(0, 3))]
        r = float(rng.uniform(0.08, 0.22) * size)
        cx, cy = (float(v) for v in rng.uniform(r * 0.6, size - r * 0.6, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        layer = Image.new("L", (size, size), 0)
        ldraw = ImageDraw.Draw(layer)
        poly = None
        if cat["name"] == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            ldraw.ellipse(box, fill=1)
            draw.ellipse(box, fill=colour)
        else:
            poly = _polygon(cat["name"], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            ldraw.polygon(poly, fill=1)
            draw.polygon(poly, fill=colour)
        mask = np.asarray(layer, dtype=bool)
        for other in instances:  # the new shape occludes what is under it
            if (other["mask"] & mask).any():
                other["mask"] = other["mask"] & ~mask
                other["polygon"] = None
        instances.append({"category_id": cat["id"], "mask": mask, "polygon": poly})
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(0.8))
    return image, [i for i in instances if i["mask"].sum() >= MIN_VISIBLE_PIXELS]


def write_split(out: Path, split: str, count: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2)])
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, instances = render_scene(rng, size)
        file_name = f"{split}/{i:06d}.jpg"
        image.save(out / file_name, quality=92)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        rles = encode_masks(np.stack([inst["mask"] for inst in instances])) if instances else []
        for inst, rle in zip(instances, rles):
            ys, xs = np.nonzero(inst["mask"])
            x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
            if inst["polygon"] is not None:
                seg = [[round(v, 2) for p in inst["polygon"] for v in p]]
            else:
                seg = rle
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": inst["category_id"],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(inst["mask"].sum()),
                "segmentation": seg, "iscrowd": 0,
            })
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    path = ann_dir / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES,
                                "info": {"description": f"synthetic shapes, seed {seed}"}}))
    return path


def write_shapes_dataset(out: str | Path, train: int = 64, val: int = 16, size: int = 128,
                         seed: int = 0) -> Path:
    """Write the dataset under `out`; returns `out`. A `.complete` marker is written last, so an
    interrupted run is regenerated rather than half-used."""
    out = Path(out)
    write_split(out, "train", train, size, seed)
    write_split(out, "val", val, size, seed)
    (out / ".complete").write_text(json.dumps({"train": train, "val": val, "size": size, "seed": seed}))
    return out
