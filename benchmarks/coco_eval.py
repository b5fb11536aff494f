"""COCOeval at COCO scale: pycocotools against faster-coco-eval on the same results.

    python benchmarks/coco_eval.py [--images 5000] [--instances 7] [--detections 100]
                                   [--out benchmarks/results/coco_eval.json]

A generated set the size of COCO val2017: 5,000 images of 640x480, 7 instances each (35,000, of
80 categories, polygons), and 100 detections an image with compressed RLE masks (jittered copies
of the ground truth and random boxes, random scores). Each library runs the whole evaluation a
job runs (load the results, evaluate, accumulate, summarize) for bbox and for segm; the table
gives the seconds and whether the 12 summary numbers agree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers
from mrcnn.evaluation.coco_eval import BACKENDS, evaluate_coco_stats  # noqa: E402
from tests.helpers.coco import generate_coco  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--instances", type=int, default=7)
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--out", default=str(Path(__file__).parent / "results/coco_eval.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    gt, results = generate_coco(a.images, a.instances, a.detections)
    print(f"generated {a.images} images, {len(gt['annotations'])} instances, {len(results)} detections "
          f"in {time.perf_counter() - t0:.0f} s")
    rows = {}
    for iou_type in ("bbox", "segm"):
        dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in results] if iou_type == "bbox" else results
        stats = {}
        for backend in BACKENDS:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                stats[backend] = evaluate_coco_stats(gt, dets, iou_type, backend=backend)
            seconds = time.perf_counter() - t0
            rows[f"{iou_type}/{backend}"] = {"seconds": seconds, "stats": stats[backend]}
        diff = max(abs(x - y) for x, y in zip(stats["pycocotools"], stats["faster"]))
        rows[f"{iou_type}/max_stat_difference"] = diff
    print(f"\n{'iou type':9s} {'pycocotools s':>14s} {'faster-coco-eval s':>19s} {'speed-up':>9s} "
          f"{'max |stat difference|':>22s}")
    for iou_type in ("bbox", "segm"):
        slow, fast = rows[f"{iou_type}/pycocotools"]["seconds"], rows[f"{iou_type}/faster"]["seconds"]
        print(f"{iou_type:9s} {slow:14.1f} {fast:19.1f} {slow / fast:8.1f}x "
              f"{rows[f'{iou_type}/max_stat_difference']:22.2e}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
