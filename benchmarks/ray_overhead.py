"""The Ray tax: a training step inside `mrcnn-train` against the same step in a plain process.

    python benchmarks/ray_overhead.py [--steps 60] [--skip 10] [--repeats 3] [HYDRA_OVERRIDES ...]

Both sides use the default job's config (`r18_fpn_small` on the shapes dataset, its batch size,
optimizer and torch threads) and the same training images through the same decode and
augmentation code. (a) `mrcnn-train trainer.epochs=1 trainer.max_steps=STEPS` in a subprocess,
its step time and data-wait share read back from its MLflow run (`system/step_s`,
`system/data_wait_share`, logged every step); (b) `workflows.engine.train_one_epoch` in this
process over batches decoded beforehand. The first `--skip` steps of each are left out (warm-up).
Runs alternate; the medians, their ratio and the machine's fp32 matrix-product rate are printed
and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops, train_job  # noqa: E402
from jobs import compose_job  # noqa: E402

from mrcnn import build_model  # noqa: E402
from workflows.data import decode_batch, ensure_shapes, load_split  # noqa: E402
from workflows.engine import train_one_epoch  # noqa: E402
from workflows.train_loop import lr_factor, make_optimizer  # noqa: E402


def window_mean(history: dict[int, float], shares: dict[int, float], skip: int, last: int) -> tuple[float, float]:
    """Mean step time and data-wait share over steps skip+1..last from the cumulative means
    the job logs at every step."""
    total = history[last] * last - history[skip] * skip
    wait = shares[last] * history[last] * last - shares[skip] * history[skip] * skip
    return total / (last - skip), wait / total


def in_ray(work: Path, steps: int, skip: int, overrides: list[str]) -> tuple[float, float]:
    client, run, _ = train_job(work / f"ray-{time.time_ns()}", [
        f"data.root={work / 'shapes'}", "trainer.epochs=1", f"trainer.max_steps={steps}",
        "trainer.log_every_steps=1", "tracking.log_images=0", "run_name=overhead", *overrides])
    step_s = {m.step: m.value for m in client.get_metric_history(run, "system/step_s")}
    share = {m.step: m.value for m in client.get_metric_history(run, "system/data_wait_share")}
    return window_mean(step_s, share, skip, steps)


def in_process(cfg: dict, batches: list[dict], skip: int) -> float:
    torch.manual_seed(cfg["seed"])
    if cfg["trainer"]["torch_threads"]:
        torch.set_num_threads(cfg["trainer"]["torch_threads"])
    model = build_model(cfg["model"])
    opt_cfg = cfg["trainer"]["optimizer"]
    optimizer = make_optimizer(model, opt_cfg, cfg["trainer"]["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, len(batches), opt_cfg))
    times = []

    def on_step(step, losses, stats):
        times.append(time.perf_counter())

    t0 = time.perf_counter()
    train_one_epoch(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False), iter(batches),
                    torch.device("cpu"), 0, grad_clip_norm=opt_cfg["grad_clip_norm"], on_step=on_step)
    times.insert(0, t0)
    return (times[-1] - times[skip]) / (len(times) - 1 - skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ray_overhead.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-overhead-"))
    cfg = compose_job([f"output_dir={work}", f"data.root={work / 'shapes'}", *a.overrides])
    ensure_shapes(cfg["data"])
    split = load_split(cfg["data"], "train")
    cfg["model"]["num_classes"] = split.categories.num_classes
    bs = cfg["trainer"]["batch_size"]
    records = (split.records * (a.steps * bs // len(split.records) + 1))[: a.steps * bs]
    batches = []
    for i in range(0, len(records), bs):
        chunk = records[i:i + bs]
        rows = {k: [r[k] for r in chunk] for k in ("image_id", "path", "file_name", "height", "width")}
        rows["annotations"] = [json.dumps(r["annotations"]) for r in chunk]
        batches.append(decode_batch(rows, cfg["data"]["s3"], train=True, augment=cfg["data"]["augment"]))
    gflops = matmul_gflops()
    plain, ray_step, wait = [], [], []
    for _ in range(a.repeats):
        plain.append(in_process(cfg, batches, a.skip))
        s, w = in_ray(work, a.steps, a.skip, a.overrides)
        ray_step.append(s)
        wait.append(w)
        print(f"plain {plain[-1]:.3f} s/step   mrcnn-train {s:.3f} s/step (data wait {100 * w:.1f} %)", flush=True)
    row = {"plain_step_s": statistics.median(plain), "ray_step_s": statistics.median(ray_step),
           "data_wait_share": statistics.median(wait), "steps": a.steps, "skip": a.skip, "repeats": a.repeats,
           "batch_size": bs, "torch_threads": torch.get_num_threads(), "matmul_gflops": gflops,
           "cpus": os.cpu_count(), "overrides": a.overrides}
    row["ratio"] = row["ray_step_s"] / row["plain_step_s"]
    print(f"\nmachine: {os.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s, torch threads {row['torch_threads']}")
    print(f"{'plain process':>15} {'mrcnn-train':>12} {'ratio':>6} {'data wait':>10}")
    print(f"{row['plain_step_s']:>13.3f} s {row['ray_step_s']:>10.3f} s {row['ratio']:>6.2f} "
          f"{100 * row['data_wait_share']:>9.1f} %")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
