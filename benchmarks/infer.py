"""Batch inference at store scale: memory per process kind, and the pipeline against the model alone.

    python benchmarks/infer.py [--images 20000] [--compare 2000] [--size 128] [--threads 2]
                               [--entries 1000000] [--parts speed precision memory driver]

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
3. The driver at store scale (no Ray, no model): a manifest of `--entries` paths and a finished
   output of as many rows (Parquet files of `infer.rows_per_file`); the time and the driver's
   resident memory to read the output's done paths, read the manifest and filter out what is
   done, as a rerun does before any work.

4. Precision (`--parts precision`). The first `--compare` images through `mrcnn-infer` in fp32,
   then with `infer.precision=bf16`, each on a fresh Ray instance: images/s of both, their ratio.

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
sys.path.insert(0, str(ROOT))  # tests.helpers
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops  # noqa: E402

from mrcnn import build_model  # noqa: E402
from mrcnn.checkpoint import save_checkpoint  # noqa: E402
from mrcnn.data.images import decode_image  # noqa: E402
from mrcnn.data.shapes import write_shapes_dataset  # noqa: E402
from mrcnn.segment import predict_images  # noqa: E402
from tests.helpers.jobs import compose_job  # noqa: E402
from tests.helpers.memory import ProcessMemory, slope_per_1000, status_kib  # noqa: E402
from workflows.jobs import infer  # noqa: E402

KINDS = ("driver", "predictor", "ray worker", "ray system")
ROWS_PER_FILE = 200


def infer_job(work: Path, store: Path, out: Path, ckpt: Path, a, precision: str = "fp32"):
    return compose_job([f"output_dir={work}", f"infer.input={store}", f"infer.output={out}", f"infer.model={ckpt}",
                        f"infer.batch_size={a.batch}", f"infer.torch_threads={a.threads}", "infer.overlays=0",
                        f"infer.rows_per_file={ROWS_PER_FILE}", "infer.score_threshold=0.05",
                        "infer.max_detections=20", f"infer.precision={precision}"])


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


def driver_at_scale(work: Path, entries: int, per_file: int = 256) -> dict:
    """What a rerun over a finished output of `entries` rows does before any work."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from workflows.inference.inputs import SCHEMA, list_inputs, prepare_output

    paths = pa.array([f"/data/store/{i // 1000:04d}/img_{i:07d}.jpg" for i in range(entries)], pa.string())
    manifest = work / "manifest.txt"
    manifest.write_text("\n".join(paths.to_pylist()) + "\n")
    out = work / "finished"
    out.mkdir()
    empty = {f.name: pa.nulls(per_file, f.type) for f in SCHEMA if f.name != "path"}
    for i in range(0, entries, per_file):
        chunk = paths.slice(i, per_file)
        pq.write_table(pa.table({"path": chunk, **{k: v.slice(0, len(chunk)) for k, v in empty.items()}},
                                schema=SCHEMA), out / f"part-{i // per_file:06d}.parquet")
    del paths
    anon0 = status_kib(os.getpid())["RssAnon"] / 1024
    with ProcessMemory(lambda: 0, interval=0.1) as mem:
        t0 = time.perf_counter()
        done = prepare_output(str(out), {}, retry_errors=False)
        listed = list_inputs({"input": str(manifest), "extensions": [".jpg"]}, {})
        todo = listed.filter(pc.invert(pc.is_in(listed, value_set=done)))
        seconds = time.perf_counter() - t0
    assert len(done) == len(listed) == entries and len(todo) == 0
    peak = max(v for _, v in mem.series("driver", "anon"))  # MiB
    return {"entries": entries, "files": -(-entries // per_file), "seconds": seconds,
            "driver_anon_before_mib": anon0, "driver_anon_peak_mib": peak}


def speed(work: Path, files: list[Path], model, ckpt: Path, a) -> dict:
    """The first `a.compare` images through the model alone, then through the pipeline."""
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
    return {"images": a.compare, "model_alone_images_per_s": alone, "pipeline_images_per_s": s.images_per_s,
            "ratio": s.images_per_s / alone, "detections_per_image": s.detections / s.images}


def precisions(work: Path, files: list[Path], ckpt: Path, a) -> dict:
    """The first `a.compare` images through the pipeline in fp32, then in bf16 (`infer.precision`)."""
    subset = work / "subset_precision"
    subset.mkdir()
    for f in files[:a.compare]:
        os.symlink(f, subset / f.name)
    rates = {}
    for precision in ("fp32", "bf16"):
        s = run_fresh(infer_job(work, subset, work / f"rows_{precision}", ckpt, a, precision))
        assert s.images == a.compare and s.errors == 0, s
        rates[precision] = s.images_per_s
    return {"images": a.compare, "fp32_images_per_s": rates["fp32"], "bf16_images_per_s": rates["bf16"],
            "ratio": rates["bf16"] / rates["fp32"]}


def memory(work: Path, store: Path, ckpt: Path, a) -> dict:
    """The whole store through the pipeline, every process sampled."""
    out = work / "rows_all"
    mem = ProcessMemory(lambda: ROWS_PER_FILE * sum(1 for e in os.scandir(out) if e.name.endswith(".parquet"))
                        if out.exists() else 0)
    s = run_fresh(infer_job(work, store, out, ckpt, a), mem)
    assert s.images == a.images and s.errors == 0, s
    return {"images": a.images, "seconds": s.seconds, "images_per_s": s.images_per_s,
            "detections_per_image": s.detections / s.images, "per_kind": memory_table(mem, a.images)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--compare", type=int, default=2000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--parts", nargs="+", choices=["speed", "precision", "memory", "driver"],
                   default=["speed", "memory", "driver"])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/infer.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-infer-"))
    gflops = matmul_gflops()
    report: dict = {"matmul_gflops": gflops, "threads": a.threads, "size": a.size}
    if {"speed", "precision", "memory"} & set(a.parts):
        cfg = compose_job([f"output_dir={work}", "model.num_classes=4"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        ckpt = work / "model.pt"
        save_checkpoint(ckpt, model, label_map={"category_ids": [1, 2, 3], "names": ["circle", "square", "triangle"]})
        model = model.set_detection_limits(0.05, 20).eval()
        t0 = time.time()
        store = write_shapes_dataset(work / "store", train=1, val=a.images, size=a.size, seed=1) / "val"
        files = sorted(store.glob("*.jpg"))
        print(f"store: {len(files)} images of {a.size} px in {time.time() - t0:.0f} s")
        if "speed" in a.parts:
            report["speed"] = speed(work, files, model, ckpt, a)
        if "precision" in a.parts:
            report["precision"] = precisions(work, files, ckpt, a)
        if "memory" in a.parts:
            report["memory"] = memory(work, store, ckpt, a)
    if "driver" in a.parts:
        report["driver"] = driver_at_scale(work, a.entries)

    print(f"\nmachine: {psutil.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s, torch threads {a.threads}")
    if "speed" in report:
        r = report["speed"]
        print(f"speed, {r['images']} images: model alone {r['model_alone_images_per_s']:.2f} img/s, pipeline "
              f"{r['pipeline_images_per_s']:.2f} img/s, ratio {r['ratio']:.2f} ({r['detections_per_image']:.1f} "
              "detections an image)")
    if "precision" in report:
        r = report["precision"]
        print(f"precision, {r['images']} images through the pipeline: fp32 {r['fp32_images_per_s']:.2f} img/s, "
              f"bf16 {r['bf16_images_per_s']:.2f} img/s, ratio {r['ratio']:.2f}")
    if "memory" in report:
        r = report["memory"]
        print(f"memory, {r['images']} images in {r['seconds']:.0f} s ({r['images_per_s']:.1f} img/s, "
              f"{r['detections_per_image']:.1f} detections an image), MiB a process (mean over a kind's processes):")
        print(f"{'process, field':>20} {'start':>8} {'warm':>8} {'end':>8} {'MiB / 1000 images':>18}")
        for name, m in r["per_kind"].items():
            print(f"{name:>20} {m['start']:>8.1f} {m['warm']:>8.1f} {m['end']:>8.1f} {m['slope_per_1000']:>18.2f}")
    if "driver" in report:
        r = report["driver"]
        print(f"driver, a rerun over a finished output of {r['entries']:,} rows ({r['files']:,} files) and a "
              f"manifest of as many paths: {r['seconds']:.1f} s, driver RssAnon {r['driver_anon_before_mib']:.0f} -> "
              f"peak {r['driver_anon_peak_mib']:.0f} MiB")
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
