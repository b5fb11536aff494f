"""Where the Ray tax lives: the plain training loop against the same loop with one more part of
the stack under it at a time.

    python benchmarks/ray_tax_parts.py [--steps 200] [--skip 10] [--startup 60] [--repeats 3]
                                       [HYDRA_OVERRIDES ...]

Every side runs `ray_overhead.in_process` (the job's `train_one_epoch`, threads, seed, optimizer
and allocator policy) over one epoch of STEPS batches of the default job's config:

  plain       this process, batches decoded beforehand, no Ray running
  beside-core the same, beside an idle local Ray instance cut to its core (no dashboard, no
              prestarted workers: GCS, raylet, their agents and log monitor)
  beside-ray  the same, beside an idle local Ray instance started as `mrcnn-train` starts one
  train       a `TorchTrainer` worker with the job's CPUs, no datasets: the batches by reference
  pulled      a `TorchTrainer` worker fed by the job's Ray Data pipeline (train and val datasets,
              the job's split), the epoch pulled into a list before the loop
  streamed    the same, streamed as `mrcnn-train` streams it

Each repeat runs the sides in that order, with a fresh Ray instance for `beside-core` and
another for the rest. Printed and written as JSON: per side, the median step time of each window
and its ratio to the plain side (the JSON also holds every repeat's times: runs drift), and, for
the Ray Train sides, the training worker's share of the cores (middle half of its life) beside
the share of everything else (`ray_overhead.CpuSampler`), with the fp32 matrix-product rate
measured before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import psutil
import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops  # noqa: E402
from ray_overhead import CpuSampler, in_process, job_batches, window_parser  # noqa: E402

from workflows.data import ExactSplitDataConfig, image_dataset  # noqa: E402
from workflows.trainer import TrainingData, init_ray, load_training_data  # noqa: E402

SIDES = ("plain", "beside-core", "beside-ray", "train", "pulled", "streamed")
TRAIN_SIDES = SIDES[3:]


class Epoch:
    """A shard's batch stream with the length `in_process` needs for its schedule."""

    def __init__(self, batches: Iterable[dict], steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter(self.batches)


def worker_loop(config: dict[str, Any]) -> None:
    """The training function of the Ray Train sides; its window times go to `config["out"]`
    (Ray Train's result holds no metrics without a checkpoint)."""
    sys.path[:0] = [config["root"], f"{config['root']}/benchmarks"]
    from ray_overhead import in_process as loop

    cfg, side = config["cfg"], config["side"]
    if side == "train":
        batches = ray.get(config["batches"])
    else:
        bs = cfg["trainer"]["batch_size"]
        stream = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=bs, batch_format="numpy", local_shuffle_buffer_size=4 * bs)
        batches = list(stream) if side == "pulled" else Epoch(stream, config["steps"])
    Path(config["out"]).write_text(json.dumps(loop(cfg, batches, config["windows"])))


def in_train(side: str, cfg: dict, data: TrainingData, batches_ref, work: Path, steps: int,
             windows: list[tuple[int, int]]) -> tuple[list[float], dict[str, float]]:
    """One Ray Train side: its window times and the CPU shares while it ran."""
    out = work / f"{side}-{time.time_ns()}.json"
    datasets: dict[str, Any] = {}
    if side != "train":
        datasets = {"dataset_config": ExactSplitDataConfig(),
                    "datasets": {"train": image_dataset(data.train, cfg["data"], train=True),
                                 "val": image_dataset(data.val, cfg["data"], train=False)}}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg, "side": side, "steps": steps, "windows": windows, "out": str(out),
                           "root": str(ROOT), "batches": batches_ref},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg["trainer"]["cpus_per_worker"]}),
        run_config=RunConfig(name=f"{side}-{time.time_ns()}", storage_path=str(work / "ray_results")),
        **datasets)
    with CpuSampler(every=2.0) as sampler:
        trainer.fit()
    return json.loads(out.read_text()), sampler.shares()


def ray_processes(before: set[int]) -> list[psutil.Process]:
    """The processes of the local Ray instance started after `before` (a set of pids):
    `ray::` workers, raylet, GCS, and the dashboard, agents and monitors under ray's package."""
    out = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] not in before and (cmd.startswith("ray::") or "/site-packages/ray/" in cmd
                                               or proc.info["name"] in ("raylet", "gcs_server")):
            out.append(proc)
    return out


@contextlib.contextmanager
def local_ray(core_only: bool):
    """A local Ray instance as `mrcnn-train` starts one, or (`core_only`) without dashboard and
    prestarted workers; on exit, shut down and waited for (some of its processes run on for
    seconds after `ray.shutdown`, taking half the cores: the next plain side must run alone)."""
    before = set(psutil.pids())
    no_prestart = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"} if core_only else {}
    saved = {key: os.environ.get(key) for key in no_prestart}
    os.environ.update(no_prestart)
    try:
        init_ray(None, dashboard=not core_only)
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
        _, alive = psutil.wait_procs(ray_processes(before), timeout=30)
        for proc in alive:
            proc.kill()


def main() -> None:
    p = window_parser(__doc__)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ray_tax_parts.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    windows = {"start-up": (a.skip, a.startup), "steady": (a.startup, a.steps)}
    spans = list(windows.values())
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-tax-parts-"))
    cfg, _, batches = job_batches(work, a.steps, a.overrides)
    data = load_training_data(cfg)
    gflops = [matmul_gflops()]
    times: dict[str, list[list[float]]] = {side: [] for side in SIDES}
    worker_share: dict[str, list[float]] = {side: [] for side in TRAIN_SIDES}
    others_share: dict[str, list[float]] = {side: [] for side in TRAIN_SIDES}
    for _ in range(a.repeats):
        times["plain"].append(in_process(cfg, batches, spans))
        with local_ray(core_only=True):
            times["beside-core"].append(in_process(cfg, batches, spans))
        with local_ray(core_only=False):
            times["beside-ray"].append(in_process(cfg, batches, spans))
            ref = ray.put(batches)
            for side in TRAIN_SIDES:
                t, shares = in_train(side, cfg, data, ref, work, a.steps, spans)
                times[side].append(t)
                worker = sum(v for k, v in shares.items() if k.startswith("ray::RayTrainWorker"))
                worker_share[side].append(worker)
                others_share[side].append(sum(shares.values()) - worker)
        print("  ".join(f"{side} " + "/".join(f"{x:.3f}" for x in times[side][-1]) for side in SIDES), flush=True)
    gflops.append(matmul_gflops())
    rows = {}
    for side in SIDES:
        row: dict[str, Any] = {"runs": times[side]}
        for i, w in enumerate(windows):
            med = statistics.median(x[i] for x in times[side])
            row[w] = {"step_s": med, "ratio": med / statistics.median(x[i] for x in times["plain"])}
        if side in worker_share:
            row["worker_cpu_share"] = statistics.median(worker_share[side])
            row["others_cpu_share"] = statistics.median(others_share[side])
        rows[side] = row
    meta = {"repeats": a.repeats, "steps": a.steps, "windows": windows, "batch_size": cfg["trainer"]["batch_size"],
            "torch_threads": cfg["trainer"]["torch_threads"], "cpus": os.cpu_count(), "matmul_gflops": gflops,
            "overrides": a.overrides}
    print(f"\nmachine: {os.cpu_count()} CPUs, fp32 matmul {gflops[0]:.0f} GFLOP/s before, {gflops[1]:.0f} after; "
          f"median of {a.repeats}; CPU shares in % of one core")
    print(f"{'side':>11} " + " ".join(f"{w + ' (steps ' + f'{lo + 1}-{hi})':>26}" for w, (lo, hi) in windows.items())
          + f" {'worker CPU':>11} {'others CPU':>11}")
    for side, row in rows.items():
        cells = " ".join(f"{row[w]['step_s']:>17.3f} s {row[w]['ratio']:>5.2f}x" for w in windows)
        cpu = (f" {100 * row['worker_cpu_share']:>9.1f} % {100 * row['others_cpu_share']:>9.1f} %"
               if "worker_cpu_share" in row else "")
        print(f"{side:>11} {cells}{cpu}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "sides": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
