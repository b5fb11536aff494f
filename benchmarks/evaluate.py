"""Evaluation wall time: predicting the val split in the driver's process against on predictor
actors (`mrcnn-evaluate`'s way), with 1 and 2 actors, for the same model and split.

    python benchmarks/evaluate.py [--images 48] [--size 256] [--model r50_fpn]
                                  [--out benchmarks/results/evaluate.json]

A shapes val split of `--images` images, a model of the `--model` config group with random
weights (score threshold 0.05, at most 100 detections: COCO's evaluation settings) saved as a
checkpoint. In-process: the model loaded here, the split's batches of 4 predicted with both
cores' threads, COCOeval. On the cluster (a local Ray instance of this machine's CPUs): the
actors load the checkpoint, each batch of 4 is read, decoded and predicted where it lands, the
driver runs COCOeval on the gathered results: 1 actor of 2 threads, then 2 actors of 1 thread
each. All three give the same metrics (checked). The machine's fp32 matrix-product rate is
printed beside the times: machines of this kind differ several times over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops  # noqa: E402

from mrcnn import build_model  # noqa: E402
from mrcnn.checkpoint import save_checkpoint  # noqa: E402
from mrcnn.data.shapes import write_shapes_dataset  # noqa: E402
from workflows.config import Paths, compose_config, with_values  # noqa: E402
from workflows.inference.evaluation import predict_split  # noqa: E402
from workflows.ingest import image_dataset, load_split  # noqa: E402
from workflows.logged_model import load_model  # noqa: E402
from workflows.registry import ResolvedModel  # noqa: E402
from workflows.runtime.allocator import reuse_large_blocks  # noqa: E402
from workflows.training.steps import predict_to_coco  # noqa: E402

LABELS = {"category_ids": [1, 2, 3], "names": ["circle", "square", "triangle"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--model", default="r50_fpn")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/evaluate.json"))
    a = p.parse_args()
    import ray

    cpus = os.cpu_count() or 2
    torch.set_num_threads(cpus)
    reuse_large_blocks()
    gflops = matmul_gflops()
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-evaluate-"))
    root = write_shapes_dataset(work / "shapes", train=1, val=a.images, size=a.size, seed=0)
    cfg = compose_config([f"model={a.model}", "model.num_classes=4", f"model.transform.min_size=[{a.size}]",
                          f"model.transform.max_size={a.size}", f"data.root={root}", "data.generate=null",
                          f"output_dir={work}", "infer.batch_size=4"])
    torch.manual_seed(0)
    checkpoint = work / "model.pt"
    save_checkpoint(checkpoint, build_model(cfg.model), label_map=LABELS, step=0)
    model = ResolvedModel(str(checkpoint), str(checkpoint))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    split = load_split(cfg.data, Paths.of(cfg).data_root, "val")
    times, metrics = {}, {}

    t0 = time.perf_counter()
    loaded = load_model(str(checkpoint))
    batches = image_dataset(split, cfg.data, train=False).iter_batches(batch_size=4, batch_format="numpy")
    metrics["in_process"] = predict_to_coco(loaded.model.eval(), batches, loaded.labels,
                                            torch.device("cpu")).evaluate(split.coco)
    times["in_process"] = time.perf_counter() - t0
    del loaded
    for actors in (1, 2):
        infer = with_values(cfg, {"infer.concurrency": actors, "infer.cpus_per_actor": cpus / actors,
                                  "infer.torch_threads": max(1, cpus // actors)}).infer
        t0 = time.perf_counter()
        predicted = predict_split(split, [model], infer, "sqlite:///unused.db", cfg.data.s3)
        metrics[f"actors_{actors}"] = predicted.results[0].evaluate(split.coco)
        times[f"actors_{actors}"] = time.perf_counter() - t0
    def equal(a: dict[str, float], b: dict[str, float]) -> bool:  # NaN (no object of a size) equals NaN
        return all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)

    same = all(equal(m, metrics["in_process"]) for m in metrics.values())
    print(f"fp32 matrix-product rate: {gflops:.0f} GFLOP/s ({cpus} threads)")
    print(f"{a.images} val images of {a.size} px, model {a.model}, batches of 4; segm_AP "
          f"{metrics['in_process']['segm_AP']:.4f}; the same metrics every way: {same}")
    print(f"{'how':34s} {'wall s':>8s} {'vs in-process':>14s}")
    names = {"in_process": "in the driver's process", "actors_1": "1 predictor actor (2 threads)",
             "actors_2": "2 predictor actors (1 thread each)"}
    for key, name in names.items():
        print(f"{name:34s} {times[key]:8.1f} {times[key] / times['in_process']:13.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "gflops": gflops, "seconds": times, "same_metrics": same,
                                       "segm_AP": metrics["in_process"]["segm_AP"]}, indent=2))
    if not same:
        raise SystemExit("the three ways gave different metrics")


if __name__ == "__main__":
    main()
