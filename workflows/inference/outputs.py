"""Batch inference outputs, after the write: the summary of the new rows, COCO results JSON and
overlay pictures."""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from mrcnn.data.images import decode_image
from mrcnn.masks import decode_rle_masks
from mrcnn.visualization import draw_predictions
from workflows.storage import S3Config, filesystem, read_bytes, to_uri, whole_file


@dataclass
class Summary:
    images: int = 0
    detections: int = 0
    errors: int = 0
    error_examples: list[str] | None = None
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def iter_rows(files: list[str], fs: pafs.FileSystem, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of the output files, a record batch at a time (never the whole store in memory)."""
    for f in files:
        for rb in pq.ParquetFile(fs.open_input_file(f)).iter_batches(columns=columns, batch_size=256):
            yield from rb.to_pylist()


def summarize(files: list[str], fs: pafs.FileSystem, seconds: float) -> Summary:
    s = Summary(error_examples=[], seconds=seconds)
    for f in files:
        t = pq.read_table(f, filesystem=fs, columns=["path", "scores", "error"])
        s.images += len(t)
        s.detections += int(pc.sum(pc.list_value_length(t.column("scores"))).as_py() or 0)
        errs = t.filter(pc.is_valid(t.column("error")))
        s.errors += len(errs)
        for row in errs.slice(0, 5).to_pylist():
            if len(s.error_examples) < 5:
                s.error_examples.append(f"{row['path']}: {row['error']}")
    return s


def write_coco_results(annotations: str, source: str, files: list[str], fs: pafs.FileSystem, s3: S3Config,
                       out: str) -> int:
    """Every detection of the output as COCO results, image ids from `annotations`
    (infer.coco_annotations) matched by file name (the path under the input folder `source`,
    else the base name). Returns the number of detections written."""
    coco = json.loads(read_bytes(annotations, s3))
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    by_base = {posixpath.basename(k): v for k, v in by_name.items()}
    root = source.rstrip("/") + "/"
    n = 0
    ofs, opath = filesystem(out, s3)
    with whole_file(ofs, opath) as f:
        f.write(b"[")
        for row in iter_rows(files, fs, ["path", "boxes", "scores", "labels", "masks", "error"]):
            if row["error"] is not None:
                continue
            rel = row["path"][len(root):] if row["path"].startswith(root) else row["path"]
            image_id = by_name.get(rel, by_base.get(posixpath.basename(row["path"])))
            if image_id is None:
                continue
            for (x1, y1, x2, y2), score, cat, rle in zip(row["boxes"], row["scores"], row["labels"], row["masks"]):
                det = {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                       "score": score, "segmentation": {"size": rle["size"], "counts": rle["counts"]}}
                f.write((b"," if n else b"") + json.dumps(det).encode())
                n += 1
        f.write(b"]")
    return n


def safe_name(path: str, root: str) -> str:
    """A flat file name from an input path: no folders, no `..`, nothing outside the output."""
    rel = path[len(root):] if path.startswith(root) else posixpath.basename(path)
    name = re.sub(r"[^\w.-]+", "_", rel.replace("\\", "/").replace("/", "__")).lstrip("._")
    return (name or "image")[:180]


def write_overlays(count: int, source: str, files: list[str], fs: pafs.FileSystem, s3: S3Config,
                   folder: str) -> list[str]:
    """Overlay PNGs for the first `count` (infer.overlays) images without error, in path order;
    named after their path under the input folder `source`."""
    rows = []
    columns = ["path", "boxes", "scores", "labels", "category_names", "masks", "error", "width", "height"]
    for row in iter_rows(files, fs, columns):
        if row["error"] is None:
            rows.append(row)
    rows = sorted(rows, key=lambda r: r["path"])[:count]
    ofs, opath = filesystem(folder, s3)
    ofs.create_dir(opath, recursive=True)
    root = source.rstrip("/") + "/"
    written = []
    for row in rows:
        image = decode_image(read_bytes(row["path"], s3), row["path"])
        masks = decode_rle_masks(row["masks"], (row["height"], row["width"])).bool()
        # Category ids as labels: a class keeps its colour across images.
        names = [""] * max(row["labels"], default=0)
        for cat, name in zip(row["labels"], row["category_names"]):
            names[cat - 1] = name
        pred = {"boxes": torch.tensor(row["boxes"]).reshape(-1, 4), "scores": torch.tensor(row["scores"]),
                "labels": torch.tensor(row["labels"], dtype=torch.long), "masks": masks}
        picture = draw_predictions(image, pred, names, score_threshold=0.0)
        target = posixpath.join(opath, safe_name(row["path"], root) + ".png")
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        with whole_file(ofs, target) as f:
            f.write(buf.getvalue())
        written.append(to_uri(target, folder))
    return written


