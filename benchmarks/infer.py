"""Batch inference: the `mrcnn-infer` pipeline against the model alone, and its memory.

    python benchmarks/infer.py [--sizes 200 2000] [--threads 2] [--out benchmarks/results/infer.json]

For each store size: the same model (r18_fpn_small shapes config, fixed random weights) on the
same decoded shapes images with the same torch threads, (a) alone in this process, batch after
batch, and (b) through the whole pipeline (list -> decode tasks -> predictor actor -> Parquet),
on a fresh local Ray instance. Prints images/s of both and their ratio, the peak resident memory
of the driver plus every Ray process, and the machine's fp32 matrix-product rate; writes JSON.
"""

from __future__ import annotations

import argparse
import json
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
from helpers.memory import PeakMemory  # noqa: E402

from mrcnn import build_model  # noqa: E402
from mrcnn.checkpoint import save_checkpoint  # noqa: E402
from mrcnn.data.images import decode_image  # noqa: E402
from mrcnn.data.shapes import write_shapes_dataset  # noqa: E402
from mrcnn.segment import predict_images  # noqa: E402
from workflows import infer  # noqa: E402
from workflows.engine import set_detection_limits  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
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
    # Random weights score every class near 1/4: a low threshold and 20 detections an image keep
    # the mask head busy, as a trained model's would be.
    model = set_detection_limits(model, 0.05, 20).eval()
    gflops = matmul_gflops()
    rows = []
    import ray

    for n in a.sizes:
        store = write_shapes_dataset(work / f"store{n}", train=1, val=n, size=128, seed=n) / "val"
        files = sorted(store.glob("*.jpg"))
        images = [torch.from_numpy(decode_image(f.read_bytes())).permute(2, 0, 1).float() / 255 for f in files]
        t0 = time.perf_counter()
        for i in range(0, len(images), a.batch):
            predict_images(model, images[i:i + a.batch])
        alone = len(images) / (time.perf_counter() - t0)

        job = compose_job([f"output_dir={work}", f"infer.input={store}", f"infer.output={work / f'rows{n}'}",
                           f"infer.model={ckpt}", f"infer.batch_size={a.batch}", f"infer.torch_threads={a.threads}",
                           "infer.overlays=0", "infer.rows_per_file=64", "infer.score_threshold=0.05",
                           "infer.max_detections=20"])
        ray.shutdown()
        ray.init(include_dashboard=False, log_to_driver=False)
        with PeakMemory() as mem:
            result = infer.run(job)
        ray.shutdown()
        s = result["summary"]
        assert s.images == n and s.errors == 0
        rows.append({"images": n, "model_alone_images_per_s": alone, "pipeline_images_per_s": s.images_per_s,
                     "ratio": s.images_per_s / alone, "peak_rss_gib": mem.peak / 2**30})
    base = rows[0]["peak_rss_gib"]
    print(f"\nmachine: {psutil.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s, torch threads {a.threads}")
    print(f"{'images':>7} {'alone img/s':>12} {'pipeline img/s':>15} {'ratio':>6} {'peak RSS GiB':>13} {'vs first':>9}")
    for r in rows:
        print(f"{r['images']:>7} {r['model_alone_images_per_s']:>12.2f} {r['pipeline_images_per_s']:>15.2f} "
              f"{r['ratio']:>6.2f} {r['peak_rss_gib']:>13.2f} {r['peak_rss_gib'] / base:>9.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"matmul_gflops": gflops, "threads": a.threads, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
