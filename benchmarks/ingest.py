"""Throughput of the Ray Data ingestion pipeline, and bytes per sample through the object store.

    python benchmarks/ingest.py [--images 200] [--size 256] [--out benchmarks/results/ingest.json]

Generates a shapes dataset, then streams the training pipeline (read bytes, decode, flip,
multi-scale resize, RLE re-encode) and reports images/s. The materialized rows' size in the
object store is compared with what the same sample costs decoded: the image plus dense uint8
masks, as a pipeline that ships dense masks would carry them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from mrcnn.data.shapes import write_shapes_dataset
from workflows.config import AugmentConfig, DataConfig
from workflows.ingest import image_dataset, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shapes_dataset(tmp, train=args.images, val=1, size=args.size, seed=0)
        cfg = DataConfig(root=str(root), augment=AugmentConfig(
            hflip_prob=0.5, scales=[args.size * 3 // 4, args.size], max_size=4 * args.size))
        split = load_split(cfg, cfg.root, "train")
        ds = image_dataset(split, cfg, train=True)
        # Warm-up pass (worker start-up), then the timed streaming pass.
        for _ in ds.iter_batches(batch_size=8, batch_format="numpy"):
            pass
        t = time.perf_counter()
        n = 0
        for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
            n += len(batch["image_id"])
        elapsed = time.perf_counter() - t
        mat = ds.materialize()
        stored = mat.size_bytes() / mat.count()
        dense = 0
        for rec in split.records:
            k = sum(1 for a in rec["annotations"] if not a["iscrowd"])
            dense += rec["height"] * rec["width"] * (3 + k)
        dense /= len(split.records)
    result = {"images": n, "seconds": elapsed, "images_per_s": n / elapsed,
              "object_store_bytes_per_sample": stored, "decoded_dense_bytes_per_sample": dense,
              "ratio_dense_over_stored": dense / stored, "image_size": args.size, "cpus": 2}
    print(f"{'images/s':32s} {result['images_per_s']:10.1f}")
    print(f"{'object store bytes / sample':32s} {stored:10.0f}")
    print(f"{'decoded image + dense masks':32s} {dense:10.0f}")
    print(f"{'dense / stored':32s} {dense / stored:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
