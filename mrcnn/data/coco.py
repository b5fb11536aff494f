"""COCO instances files -> per-image training records, with a validation report.

A record is a plain dict (it crosses to Ray as-is):
    {"image_id": int, "file_name": str, "height": int, "width": int,
     "annotations": [{"bbox": [x1, y1, x2, y2], "label": int, "category_id": int,
                      "rle": {"size": [h, w], "counts": str}, "iscrowd": 0|1, "area": float}]}
Labels are contiguous 1..K in the order of the sorted category ids; 0 is background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from pycocotools import mask as mask_utils

from mrcnn.masks import to_compressed_rle


@dataclass
class CategoryMap:
    """COCO category ids (with gaps) <-> contiguous labels 1..K, and the names."""

    category_ids: list[int]
    names: list[str]

    @classmethod
    def from_coco(cls, categories: list[dict[str, Any]]) -> CategoryMap:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls([int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats])

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.category_ids) + 1

    def label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        return self.category_ids[label - 1]

    def to_dict(self) -> dict[str, Any]:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoryMap:
        return cls([int(i) for i in d["category_ids"]], [str(n) for n in d["names"]])


@dataclass
class ValidationReport:
    """What was skipped or fixed while reading an annotation file: counts and a few examples."""

    source: str
    images: int = 0
    annotations: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, problem: str, example: str) -> None:
        self.counts[problem] = self.counts.get(problem, 0) + 1
        ex = self.examples.setdefault(problem, [])
        if len(ex) < 5:
            ex.append(example)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.images} images, {self.annotations} usable annotations"]
        for problem, n in sorted(self.counts.items()):
            lines.append(f"  {problem}: {n} (e.g. {'; '.join(self.examples[problem])})")
        return "\n".join(lines)


def read_json(path_or_dict: str | dict[str, Any], opener: Callable[[str], Any] | None = None) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    try:
        if opener is None:
            with open(path_or_dict, "rb") as f:
                return json.load(f)
        with opener(path_or_dict) as f:
            return json.loads(f.read())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"annotation file {path_or_dict} does not exist") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path_or_dict} is not valid JSON: {e}") from e


def load_coco_records(
    annotations: str | dict[str, Any],
    image_exists: Callable[[str], bool] | None = None,
    missing_images: str = "error",
    keep_empty: bool = True,
    categories: CategoryMap | None = None,
    opener: Callable[[str], Any] | None = None,
) -> tuple[list[dict[str, Any]], CategoryMap, ValidationReport]:
    """Read a COCO instances file into records, validating as it goes.

    Args:
        annotations: path to the JSON file or the parsed dict.
        image_exists: called with each `file_name`; None skips the check.
        missing_images: "error" (raise, naming the file) or "skip" (drop and count).
        keep_empty: keep images without usable annotations (background-only training images).
        categories: a label map to use (e.g. the training set's, for a val file).
        opener: opens a path for reading bytes (for s3:// through pyarrow).

    Bad annotations (unknown category, degenerate polygon, zero or negative area box,
    duplicate id) are skipped and counted; boxes outside the image are clipped and counted.
    Crowd regions are kept with `iscrowd=1`: they never train as instances.
    """
    source = annotations if isinstance(annotations, str) else "<annotations>"
    data = read_json(annotations, opener)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{source}: not a COCO instances file (no {key!r} key)")
    report = ValidationReport(source)
    cats = categories or CategoryMap.from_coco(data["categories"])
    known = set(cats.category_ids)

    images: dict[int, dict[str, Any]] = {}
    for im in data["images"]:
        iid = im.get("id")
        if iid in images:
            report.add("duplicate image id", f"id {iid}")
            continue
        if not all(k in im for k in ("id", "file_name", "height", "width")):
            report.add("image entry missing id/file_name/height/width", json.dumps(im)[:80])
            continue
        if image_exists is not None and not image_exists(im["file_name"]):
            if missing_images == "error":
                raise FileNotFoundError(
                    f"{source}: image {im['file_name']!r} (id {iid}) is missing; fix the path "
                    "or set data.missing_images=skip to drop such images")
            report.add("missing image file", f"{im['file_name']} (id {iid})")
            continue
        images[iid] = {"image_id": int(iid), "file_name": str(im["file_name"]),
                       "height": int(im["height"]), "width": int(im["width"]), "annotations": []}

    seen_ann: set[int] = set()
    for ann in data["annotations"]:
        aid = ann.get("id")
        rec = images.get(ann.get("image_id"))
        if rec is None:
            report.add("annotation of an unknown or dropped image", f"ann {aid} image {ann.get('image_id')}")
            continue
        if aid in seen_ann:
            report.add("duplicate annotation id", f"ann {aid}")
            continue
        seen_ann.add(aid)
        if ann.get("category_id") not in known:
            report.add("unknown category id", f"ann {aid} category {ann.get('category_id')}")
            continue
        parsed = _parse_annotation(ann, rec["height"], rec["width"], report)
        if parsed is not None:
            parsed["label"] = cats.label(ann["category_id"])
            rec["annotations"].append(parsed)

    records = []
    for rec in images.values():
        n = sum(1 for a in rec["annotations"] if not a["iscrowd"])
        report.annotations += n
        if n == 0:
            report.add("image without annotations", f"{rec['file_name']} (id {rec['image_id']})")
            if not keep_empty:
                continue
        records.append(rec)
    report.images = len(records)
    return records, cats, report


def _parse_annotation(ann: dict[str, Any], h: int, w: int, report: ValidationReport) -> dict | None:
    aid = ann.get("id")
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        report.add("missing or malformed bbox", f"ann {aid}")
        return None
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        report.add("zero or negative area box", f"ann {aid} bbox {bbox}")
        return None
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
    if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
        report.add("box outside the image (clipped)", f"ann {aid} bbox {bbox} in {w}x{h}")
    if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
        report.add("box entirely outside the image", f"ann {aid} bbox {bbox} in {w}x{h}")
        return None
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        seg = [p for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
        if not seg:
            report.add("degenerate polygon", f"ann {aid}")
            return None
    try:
        rle = to_compressed_rle(seg, h, w)
    except (ValueError, TypeError, KeyError) as e:
        report.add("unreadable segmentation", f"ann {aid}: {e}")
        return None
    if tuple(rle["size"]) != (h, w):
        report.add("mask size differs from the image", f"ann {aid} size {rle['size']} vs {h}x{w}")
        return None
    iscrowd = int(bool(ann.get("iscrowd", 0)))
    area = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))
    if area <= 0 and not iscrowd:
        report.add("empty mask", f"ann {aid}")
        return None
    return {"bbox": [x1, y1, x2, y2], "category_id": int(ann["category_id"]), "rle": rle,
            "iscrowd": iscrowd, "area": area}
