"""The Ray tax: a training step inside `mrcnn-train` against the same step in a plain process.

    python benchmarks/ray_overhead.py [--steps 200] [--skip 10] [--startup 60] [--repeats 3]
                                      [--background N] [HYDRA_OVERRIDES ...]

Both sides use the default job's config (`r18_fpn_small` on the shapes dataset, its batch size,
optimizer and torch threads) and the same training images through the same decode and
augmentation code; the generated training set holds STEPS batches, so the window is one epoch.
(a) `mrcnn-train trainer.epochs=1 trainer.max_steps=STEPS` in a subprocess, its step time and
data-wait share read back from its MLflow run (`system/step_s`, `system/data_wait_share`, the
epoch's running means, logged every `trainer.log_every_steps` as in any run: window ends are
multiples of it); (b) `workflows.engine.train_one_epoch` in this process over batches decoded
beforehand. The first `--skip` steps of each are left out (warm-up). Two windows are reported:
steps skip+1..startup, while Ray's processes (split coordinators, dataset manager, decode
workers) are still starting beside the first steps, and startup+1..STEPS, the steady state the
rest of a run sees. While the job runs, every process's CPU time is sampled: the table of CPU
shares over the middle half of the training worker's life shows where the cores went. Runs
alternate; the medians, their ratios and the machine's fp32 matrix-product rate are printed and
written as JSON. `--background N` also times the plain process beside N processes that do what
each of Ray's idle workers does (wake 160 times a second, run 30 us): how much of the tax such a
background explains.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops, train_job  # noqa: E402
from jobs import compose_job  # noqa: E402

from mrcnn import build_model  # noqa: E402
from workflows.allocator import reuse_large_blocks  # noqa: E402
from workflows.data import decode_batch, ensure_shapes, load_split  # noqa: E402
from workflows.engine import train_one_epoch  # noqa: E402
from workflows.train_loop import lr_factor, make_optimizer  # noqa: E402


def window_mean(history: dict[int, float], shares: dict[int, float], skip: int, last: int) -> tuple[float, float]:
    """Mean step time and data-wait share over steps skip+1..last from the cumulative means
    the job logs at every step."""
    total = history[last] * last - history[skip] * skip
    wait = shares[last] * history[last] * last - shares[skip] * history[skip] * skip
    return total / (last - skip), wait / total


class CpuSampler(threading.Thread):
    """Every process's CPU seconds (user + system) every `every` s, while in its `with` block (a
    sweep reads two small /proc files a process, so the sampler's own share stays small)."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.stop, self.samples = every, threading.Event(), []

    @staticmethod
    def name(proc: psutil.Process) -> str:
        """`ray::Class` for Ray's workers (their title names the running method: dropped),
        else the executable."""
        try:
            cmd = proc.cmdline()
            name = cmd[0].split(" ")[0].split(".")[0] if cmd and cmd[0].startswith("ray::") else proc.name()
        except psutil.Error:
            name = "?"
        return name[:40]

    def __enter__(self) -> CpuSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()

    def run(self) -> None:
        while not self.stop.is_set():
            snap = {}
            for proc in psutil.process_iter(["cpu_times"]):
                cpu = proc.info["cpu_times"]
                if cpu is not None:
                    snap[proc.pid] = (self.name(proc), cpu.user + cpu.system)
            self.samples.append((time.time(), snap))
            self.stop.wait(self.every)

    def shares(self) -> dict[str, float]:
        """Per process name, its share of one core over the middle half of the training worker's
        life (ray::RayTrainWorker), summed over processes of that name."""
        alive = [t for t, snap in self.samples if any(n.startswith("ray::RayTrainWorker") for n, _ in snap.values())]
        if len(alive) < 4:
            return {}
        lo, hi = alive[0] + (alive[-1] - alive[0]) / 4, alive[-1] - (alive[-1] - alive[0]) / 4
        window = [(t, snap) for t, snap in self.samples if lo <= t <= hi]
        if len(window) < 2:  # a worker too short-lived to sample its middle half
            return {}
        (t0, a), (t1, b) = window[0], window[-1]
        out: dict[str, float] = defaultdict(float)
        for pid, (name, cpu) in b.items():
            if pid in a:
                out[name] += (cpu - a[pid][1]) / (t1 - t0)
        return dict(out)


def _wake_and_spin(hz: float, run_s: float) -> None:
    while True:
        time.sleep(1 / hz)
        t = time.perf_counter()
        while time.perf_counter() - t < run_s:
            pass


def beside_background(n: int, fn, *args):
    """fn(*args) while n processes each wake 160 times a second and run 30 us."""
    procs = [multiprocessing.Process(target=_wake_and_spin, args=(160.0, 30e-6), daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        return fn(*args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.join()


def in_ray(work: Path, steps: int, windows: list[tuple[int, int]], overrides: list[str]
           ) -> tuple[list[tuple[float, float]], dict[str, float]]:
    with CpuSampler() as sampler:
        client, run, _ = train_job(work / f"ray-{time.time_ns()}", [
            f"data.root={work / 'shapes'}", "trainer.epochs=1", f"trainer.max_steps={steps}",
            "tracking.log_images=0", "run_name=overhead", *overrides])
    step_s = {m.step: m.value for m in client.get_metric_history(run, "system/step_s")}
    share = {m.step: m.value for m in client.get_metric_history(run, "system/data_wait_share")}
    return [window_mean(step_s, share, a, b) for a, b in windows], sampler.shares()


def job_batches(work: Path, steps: int, overrides: list[str]) -> tuple[dict, list[str], list[dict]]:
    """The default job's config (data under `work`) with a generated training set of exactly
    `steps` batches, so that the window is one epoch; the overrides that say so, for the job's
    command line; and those batches, read, decoded and augmented in this process by the job's
    own `decode_batch`."""
    cfg = compose_job([f"output_dir={work}", f"data.root={work / 'shapes'}", *overrides])
    bs = cfg["trainer"]["batch_size"]
    overrides = [f"data.generate.train={steps * bs}", *overrides]
    cfg = compose_job([f"output_dir={work}", f"data.root={work / 'shapes'}", *overrides])
    ensure_shapes(cfg["data"])
    split = load_split(cfg["data"], "train")
    cfg["model"]["num_classes"] = split.categories.num_classes
    records = (split.records * (steps * bs // len(split.records) + 1))[: steps * bs]
    batches = []
    for i in range(0, len(records), bs):
        chunk = records[i:i + bs]
        rows = {k: [r[k] for r in chunk] for k in ("image_id", "path", "file_name", "height", "width")}
        rows["annotations"] = [json.dumps(r["annotations"]) for r in chunk]
        batches.append(decode_batch(rows, cfg["data"]["s3"], train=True, augment=cfg["data"]["augment"]))
    return cfg, overrides, batches


def in_process(cfg: dict, batches: Iterable[dict], windows: list[tuple[int, int]]) -> list[float]:
    """`train_one_epoch` of a fresh model over `batches` (an iterable with a length) with the job's
    threads, seed, optimizer and allocator policy, in the calling thread; the mean step time in
    seconds over each window (a, b]: steps a+1..b."""
    torch.manual_seed(cfg["seed"])
    if cfg["trainer"]["torch_threads"]:
        torch.set_num_threads(cfg["trainer"]["torch_threads"])
    reuse_large_blocks()  # as the training worker does
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
    return [(times[b] - times[a]) / (b - a) for a, b in windows]


def window_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every Ray tax benchmark takes: the epoch's steps, the two windows, repeats."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--startup", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main() -> None:
    p = window_parser(__doc__)
    p.add_argument("--background", type=int, default=0, metavar="N",
                   help="also time the plain process beside N processes waking like Ray's idle workers")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ray_overhead.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    windows = {"start-up": (a.skip, a.startup), "steady": (a.startup, a.steps)}
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-overhead-"))
    cfg, overrides, batches = job_batches(work, a.steps, a.overrides)
    bs = cfg["trainer"]["batch_size"]
    gflops = matmul_gflops()
    plain = {w: [] for w in windows}
    ray_step = {w: [] for w in windows}
    beside = {w: [] for w in windows}
    wait = {w: [] for w in windows}
    cpu: dict[str, list[float]] = defaultdict(list)
    for _ in range(a.repeats):
        for w, t in zip(windows, in_process(cfg, batches, list(windows.values()))):
            plain[w].append(t)
        if a.background:
            for w, t in zip(windows, beside_background(a.background, in_process, cfg, batches, list(windows.values()))):
                beside[w].append(t)
        steps, shares = in_ray(work, a.steps, list(windows.values()), overrides)
        for w, (s, share) in zip(windows, steps):
            ray_step[w].append(s)
            wait[w].append(share)
        for name, share in shares.items():
            cpu[name].append(share)
        print("  ".join(f"{w}: plain {plain[w][-1]:.3f} s/step, mrcnn-train {ray_step[w][-1]:.3f} s/step "
                        f"(data wait {100 * wait[w][-1]:.1f} %)" for w in windows), flush=True)
    rows = {}
    for w, (lo, hi) in windows.items():
        row = {"steps": f"{lo + 1}-{hi}", "plain_step_s": statistics.median(plain[w]),
               "ray_step_s": statistics.median(ray_step[w]), "data_wait_share": statistics.median(wait[w])}
        row["ratio"] = row["ray_step_s"] / row["plain_step_s"]
        if a.background:
            row["plain_beside_background_s"] = statistics.median(beside[w])
            row["background_ratio"] = row["plain_beside_background_s"] / row["plain_step_s"]
        rows[w] = row
    meta = {"repeats": a.repeats, "background_processes": a.background, "batch_size": bs,
            "torch_threads": torch.get_num_threads(), "matmul_gflops": gflops, "cpus": os.cpu_count(),
            "overrides": a.overrides}
    print(f"\nmachine: {os.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s, torch threads {meta['torch_threads']}")
    print(f"{'window':>9} {'steps':>8} {'plain process':>14} {'mrcnn-train':>12} {'ratio':>6} {'data wait':>10}")
    for w, row in rows.items():
        print(f"{w:>9} {row['steps']:>8} {row['plain_step_s']:>12.3f} s {row['ray_step_s']:>10.3f} s "
              f"{row['ratio']:>6.2f} {100 * row['data_wait_share']:>9.1f} %")
    if a.background:
        print(f"\nplain process beside {a.background} processes waking 160 times a second for 30 us:")
        for w, row in rows.items():
            print(f"{w:>9} {row['steps']:>8} {row['plain_beside_background_s']:>12.3f} s "
                  f"{row['background_ratio']:>6.2f}x the plain step")
    cpu_share = {name: statistics.median(v) for name, v in cpu.items() if statistics.median(v) >= 0.005}
    cpu_share = dict(sorted(cpu_share.items(), key=lambda kv: -kv[1]))
    print(f"\nCPU during the job (share of one core, middle half of the training worker's life; "
          f"{os.cpu_count()} cores = {100 * (os.cpu_count() or 1)} %):")
    for name, share in cpu_share.items():
        print(f"{100 * share:8.1f} %  {name}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "windows": rows, "cpu_share": cpu_share}, indent=2) + "\n")


if __name__ == "__main__":
    main()
