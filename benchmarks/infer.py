"""Batch inference at store scale: memory per process kind, and the pipeline against the model alone.

    python benchmarks/infer.py [--images 20000] [--compare 2000] [--size 128] [--threads 2]

The model: the default r18_fpn_small config with fixed random weights, score threshold 0.05 and
20 detections an image, so every row carries boxes and RLE masks. The store: N generated shapes
JPEGs of `--size` px.

1. Speed. The first `--compare` images through the model alone in this process (decoded in
   memory beforehand, batch after batch) and through `mrcnn-infer` on a fresh local Ray instance
   (listing, actor start and model load included): images/s of both and their ratio.
2. Memory. `mrcnn-infer` over all N images on a fresh Ray instance, every process's RssAnon
   (its own memory) and RssShmem (the pages of Ray's object store it has touched) sampled each
   second against the images written so far: per kind (driver, predictor actors, Ray workers
   (decode and write tasks), Ray's own processes) at start, after warm-up (the first 10 % of the
   images) and at the end, and the slope per 1,000 images after warm-up.

Prints the machine's fp32 matrix-product rate beside the figures; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops  # noqa: E402
from helpers.jobs import compose_job  # noqa: E402
from helpers.memory import ProcessMemory, slope_per_1000  # noqa: E402

from mrcnn import build_model  # noqa: E402
from mrcnn.checkpoint import save_checkpoint  # noqa: E402
from mrcnn.data.images import decode_image  # noqa: E402
from mrcnn.data.shapes import write_shapes_dataset  # noqa: E402
from mrcnn.segment import predict_images  # noqa: E402
from workflows import infer  # noqa: E402
from workflows.engine import set_detection_limits  # noqa: E402

KINDS = ("driver", "predictor", "ray worker", "ray system")
ROWS_PER_FILE = 200


def infer_job(work: Path, store: Path, out: Path, ckpt: Path, a) -> dict:
    return compose_job([f"output_dir={work}", f"infer.input={store}", f"infer.output={out}", f"infer.model={ckpt}",
                        f"infer.batch_size={a.batch}", f"infer.torch_threads={a.threads}", "infer.overlays=0",
                        f"infer.rows_per_file={ROWS_PER_FILE}", "infer.score_threshold=0.05",
                        "infer.max_detections=20"])


def run_fresh(job: dict, memory: ProcessMemory | None = None):
    import ray

    ray.shutdown()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        if memory is None:
            return infer.run(job)["summary"]
        with memory:
            return infer.run(job)["summary"]
    finally:
        ray.shutdown()


def memory_table(mem: ProcessMemory, images: int) -> dict:
    """Per kind and field: MiB at start, after warm-up, at the end; slope per 1,000 images."""
    warm = images // 10
    table = {}
    for kind in KINDS:
        for field in ("anon", "shmem"):
            points = mem.series(kind, field)
            if not points:
                continue
            after = [p for p in points if p[0] >= warm] or points[-1:]
            table[f"{kind} {field}"] = {"start": points[0][1], "warm": after[0][1], "end": points[-1][1],
                                        "slope_per_1000": slope_per_1000(after)}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--compare", type=int, default=2000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/infer.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-infer-"))
    cfg = compose_job([f"output_dir={work}", "model.num_classes=4"])
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, model, label_map={"category_ids": [1, 2, 3], "names": ["circle", "square", "triangle"]})
    model = set_detection_limits(model, 0.05, 20).eval()
    gflops = matmul_gflops()

    t0 = time.time()
    store = write_shapes_dataset(work / "store", train=1, val=a.images, size=a.size, seed=1) / "val"
    files = sorted(store.glob("*.jpg"))
    print(f"store: {len(files)} images of {a.size} px in {time.time() - t0:.0f} s")

    # 1. speed: the first --compare images, alone and through the pipeline
    subset = work / "subset"
    subset.mkdir()
    for f in files[:a.compare]:
        os.symlink(f, subset / f.name)
    images = [torch.from_numpy(decode_image(f.read_bytes())).permute(2, 0, 1).float() / 255 for f in files[:a.compare]]
    t0 = time.perf_counter()
    for i in range(0, len(images), a.batch):
        predict_images(model, images[i:i + a.batch])
    alone = len(images) / (time.perf_counter() - t0)
    del images
    s = run_fresh(infer_job(work, subset, work / "rows_subset", ckpt, a))
    assert s.images == a.compare and s.errors == 0, s
    speed = {"images": a.compare, "model_alone_images_per_s": alone, "pipeline_images_per_s": s.images_per_s,
             "ratio": s.images_per_s / alone, "detections_per_image": s.detections / s.images}

    # 2. memory over the whole store
    out = work / "rows_all"
    mem = ProcessMemory(lambda: ROWS_PER_FILE * sum(1 for e in os.scandir(out) if e.name.endswith(".parquet"))
                        if out.exists() else 0)
    s = run_fresh(infer_job(work, store, out, ckpt, a), mem)
    assert s.images == a.images and s.errors == 0, s
    table = memory_table(mem, a.images)

    print(f"\nmachine: {psutil.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s, torch threads {a.threads}")
    print(f"speed, {a.compare} images: model alone {alone:.2f} img/s, pipeline {speed['pipeline_images_per_s']:.2f} "
          f"img/s, ratio {speed['ratio']:.2f} ({speed['detections_per_image']:.1f} detections an image)")
    print(f"memory, {a.images} images in {s.seconds:.0f} s ({s.images_per_s:.1f} img/s), MiB per process "
          f"(mean over the processes of a kind):")
    print(f"{'process, field':>20} {'start':>8} {'warm':>8} {'end':>8} {'MiB / 1000 images':>18}")
    for name, r in table.items():
        print(f"{name:>20} {r['start']:>8.1f} {r['warm']:>8.1f} {r['end']:>8.1f} {r['slope_per_1000']:>18.2f}")
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"matmul_gflops": gflops, "threads": a.threads, "size": a.size, "speed": speed,
                                "memory": {"images": a.images, "seconds": s.seconds, "per_kind": table}}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
