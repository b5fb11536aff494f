"""What the benchmarks share: the machine's matrix-product rate and running `mrcnn-train`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-product rate in `dtype` (fp32 unless said) with the current torch
    threads (best of `repeats`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def train_job(out: Path, overrides: list[str]) -> tuple[MlflowClient, str, float]:
    """Run `mrcnn-train output_dir=OUT OVERRIDES` as a user would (a new process, its own local
    Ray); returns the client of its MLflow store, its run id and the wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    t0 = time.time()
    done = subprocess.run([str(Path(sys.executable).parent / "mrcnn-train"), f"output_dir={out}", *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("maskrcnn").experiment_id])[0].info.run_id
    return client, run, wall
