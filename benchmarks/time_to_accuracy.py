"""Time to accuracy of the default job: shapes val mask AP against wall time.

    python benchmarks/time_to_accuracy.py [--repeats 1] [--target 0.6] [HYDRA_OVERRIDES ...]

Runs `mrcnn-train` as `make run` does (embedded defaults, a fresh output folder: the dataset is
generated and Ray started inside the timed run) and reads each evaluation's `val/segm_AP` and
`val/bbox_AP` with its timestamp back from the run's MLflow store. Prints a table, the minutes to
the target mask AP and the machine's fp32 matrix-product rate; writes JSON and a PNG plot.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import matmul_gflops, train_job  # noqa: E402


def one_run(work: Path, overrides: list[str]) -> dict:
    t0 = time.time()
    client, run, wall = train_job(work / f"run-{time.time_ns()}", overrides)
    bbox = {m.step: m.value for m in client.get_metric_history(run, "val/bbox_AP")}
    epochs = {m.step: m.value for m in client.get_metric_history(run, "train/epochs_completed")}
    points = [{"step": m.step, "epoch": int(epochs.get(m.step, 0)), "minutes": (m.timestamp / 1000 - t0) / 60,
               "segm_AP": m.value, "bbox_AP": bbox.get(m.step)}
              for m in sorted(client.get_metric_history(run, "val/segm_AP"), key=lambda m: m.step)]
    return {"wall_minutes": wall / 60, "points": points}


def minutes_to(points: list[dict], target: float) -> float | None:
    return next((p["minutes"] for p in points if p["segm_AP"] >= target), None)


def plot(runs: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, r in enumerate(runs):
        ax.plot([0] + [p["minutes"] for p in r["points"]], [0] + [p["segm_AP"] for p in r["points"]], "o-",
                label=f"run {i + 1}: mask AP")
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target}")
    ax.axvline(10, color="grey", ls=":", lw=1)
    ax.set_xlabel("wall time (minutes, dataset generation and Ray start included)")
    ax.set_ylabel("shapes val mask AP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/time_to_accuracy.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    gflops = matmul_gflops()
    work = Path(tempfile.mkdtemp(prefix="mrcnn-bench-tta-"))
    runs = []
    for i in range(a.repeats):
        runs.append(one_run(work, a.overrides))
        r = runs[-1]
        print(f"\nrun {i + 1}: {r['wall_minutes']:.1f} min wall")
        print(f"{'epoch':>5} {'step':>6} {'minutes':>8} {'mask AP':>8} {'box AP':>8}")
        for pt in r["points"]:
            print(f"{pt['epoch']:>5} {pt['step']:>6} {pt['minutes']:>8.1f} {pt['segm_AP']:>8.3f} {pt['bbox_AP']:>8.3f}")
    reached = [minutes_to(r["points"], a.target) for r in runs]
    final = [r["points"][-1]["segm_AP"] for r in runs]
    summary = {"target": a.target, "minutes_to_target": reached, "final_segm_AP": final,
               "median_final_segm_AP": statistics.median(final),
               "median_wall_minutes": statistics.median(r["wall_minutes"] for r in runs),
               "matmul_gflops": gflops, "cpus": os.cpu_count(), "overrides": a.overrides, "runs": runs}
    print(f"\nmachine: {os.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s")
    print(f"final mask AP {', '.join(f'{f:.3f}' for f in final)}; wall {summary['median_wall_minutes']:.1f} min "
          f"(median); mask AP >= {a.target} after: "
          + ", ".join("not reached" if m is None else f"{m:.1f} min" for m in reached))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, a.target, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
