"""Online segmentation: `mrcnn-serve` against `mlflow models serve`, same model, same images.

    python benchmarks/serve.py [--concurrency 1 4 8 16] [--requests 96] [--size 128] [--threads 2]

The model: the default r18_fpn_small config with fixed random weights, registered in a SQLite
registry made here; every request asks `score_threshold=0` and `max_detections=10`, so every
answer carries 10 boxes and RLE masks. The images: 32 generated shapes JPEGs of `--size` px, sent
in turn.

1. The ceiling: the model alone in this process with `--threads` torch threads, the images
   decoded, predicted and RLE-encoded in batches of serve.max_batch_size: images/s.
2. `mrcnn-serve` (one replica of `--threads` torch threads, its defaults otherwise) on a fresh
   local Ray: POST /segment (raw JPEG bytes) and POST /invocations (MLflow's JSON, base64).
3. `mlflow models serve --env-manager local` of the same registered version: POST /invocations.

Each server is driven by aiohttp from this process: `--requests` requests at each concurrency
(after 8 of warm-up), one image a request; throughput and p50/p95/p99 latency, and beside each the
model alone measured again just before it (`ceiling`, 6 s, the server idle): this machine's speed
drifts by a third within minutes, so each ratio is of two figures taken together. Prints the
machine's fp32 matrix-product rate; writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_gflops  # noqa: E402

BIN = Path(sys.executable).parent
NAME = "bench-serve"
PARAMS = {"score_threshold": 0.0, "max_detections": 10}
BATCH = 4  # serve.max_batch_size's default


def register(work: Path, overrides: list[str]) -> str:
    from mrcnn import build_model
    from workflows.config import as_dict, compose_config
    from workflows.logged_model import log_model
    from workflows.registry import register_model
    from workflows.tracking import mlflow_client, start_or_resume_run

    uri = f"sqlite:///{work / 'mlflow.db'}"
    torch.manual_seed(0)
    model = build_model(compose_config(["model.num_classes=4", *overrides]).model)
    run_id = start_or_resume_run(uri, "maskrcnn", "bench-serve", {"model": as_dict(model.cfg)})
    log_model(uri, run_id, {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                            "label_map": {"category_ids": [1, 2, 3], "names": ["circle", "square", "triangle"]}})
    register_model(mlflow_client(uri), run_id, NAME, alias="champion")
    return uri


def model_alone(uri: str, jpegs: list[bytes], threads: int, seconds: float = 20.0) -> float:
    """Images/s of decode + predict + RLE-encode in batches of BATCH, in this process."""
    from mrcnn.segment import segment_encoded
    from workflows.logged_model import load_model

    torch.set_num_threads(threads)
    loaded = load_model(f"models:/{NAME}/1", uri)
    model = loaded.model.eval().set_detection_limits(PARAMS["score_threshold"], PARAMS["max_detections"])
    batches = [[(jpegs[(i + k) % len(jpegs)], "x") for k in range(BATCH)] for i in range(0, len(jpegs), BATCH)]
    segment_encoded(model, batches[0], loaded.labels)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rows = segment_encoded(model, batches[done // BATCH % len(batches)], loaded.labels)
        assert all(len(r["boxes"]) == PARAMS["max_detections"] for r in rows)
        done += len(rows)
    return done / (time.perf_counter() - t0)


async def drive(url: str, bodies: list[bytes], headers: dict[str, str], concurrency: int, requests: int) -> dict:
    """`requests` POSTs, `concurrency` at a time -> throughput and latency percentiles (ms)."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append((time.perf_counter() - t0) * 1000)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        warm = list(range(8))
        queue, held = warm, list(range(requests))
        await asyncio.gather(*(client(session) for _ in range(min(concurrency, 8))))
        queue, latencies, statuses = held, [], {}
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"concurrency": concurrency, "requests": requests, "images_per_s": requests / seconds,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "statuses": statuses}


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def serve_rows(name: str, levels: list[dict]) -> list[str]:
    return [f"| {name} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['ceiling']:.1f} | "
            f"{r['images_per_s'] / r['ceiling']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['statuses']} |" for r in levels]


def levels(url: str, bodies: list[bytes], headers: dict[str, str], a, ceiling) -> list[dict]:
    """Each concurrency: the model alone (the ceiling), then the server."""
    out = []
    for c in a.concurrency:
        top = ceiling()
        out.append({**asyncio.run(drive(url, bodies, headers, c, a.requests)), "ceiling": top})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", nargs="*", default=[], help="model overrides (default: r18_fpn_small)")
    p.add_argument("--serve", nargs="*", default=[], help="more mrcnn-serve overrides (serve.max_batch_size=8 ...)")
    p.add_argument("--servers", nargs="+", default=["segment", "invocations", "mlflow"],
                   help="which to drive: segment, invocations (mrcnn-serve's two routes), mlflow")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/serve.json"))
    a = p.parse_args()

    from mrcnn.data.shapes import write_shapes_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    shapes = write_shapes_dataset(work / "shapes", 1, 32, a.size, 0)
    jpegs = [f.read_bytes() for f in sorted((shapes / "val").glob("*.jpg"))]
    uri = register(work, a.model)
    gflops = matmul_gflops()
    print(f"fp32 matrix products: {gflops:.0f} GFLOP/s; {a.threads} torch threads; {a.size} px images; "
          f"model {' '.join(a.model) or 'r18_fpn_small'}")
    result: dict = {"gflops_fp32": gflops, "threads": a.threads, "size": a.size, "model": a.model, "serve": a.serve}
    result["model_alone"] = model_alone(uri, jpegs, a.threads)
    print(f"model alone (batches of {BATCH}): {result['model_alone']:.1f} images/s")

    def ceiling() -> float:
        return model_alone(uri, jpegs, a.threads, seconds=6)

    frames = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(j).decode()]]},
                          "params": PARAMS}).encode() for j in jpegs]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    query = "&".join(f"{k}={v}" for k, v in PARAMS.items())

    port = 8931
    log = work / "mrcnn-serve.log"
    proc = subprocess.Popen([str(BIN / "mrcnn-serve"), f"output_dir={work / 'out'}", f"tracking.tracking_uri={uri}",
                             f"serve.model=models:/{NAME}@champion", f"serve.port={port}",
                             *([] if any(o.startswith("serve.torch_threads=") for o in a.serve)
                               else [f"serve.torch_threads={a.threads}"]), *a.serve],
                            env=env, cwd=work, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log)
        for path, bodies, headers, key in (
                (f"/segment?{query}", jpegs, {"Content-Type": "image/jpeg"}, "mrcnn_serve_segment"),
                ("/invocations", frames, {"Content-Type": "application/json"}, "mrcnn_serve_invocations")):
            if key.rsplit("_", 1)[1] not in a.servers:
                continue
            result[key] = levels(f"http://127.0.0.1:{port}{path}", bodies, headers, a, ceiling)
            print("\n".join(serve_rows(key, result[key])))
    finally:
        stop(proc)
    if "mlflow" in a.servers:
        port = 8932
        log = work / "mlflow-serve.log"
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)],
                                env={**env, "OMP_NUM_THREADS": str(a.threads)}, cwd=work, stdout=open(log, "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/ping", proc, log)
            result["mlflow_models_serve"] = levels(f"http://127.0.0.1:{port}/invocations", frames,
                                                   {"Content-Type": "application/json"}, a, ceiling)
            print("\n".join(serve_rows("mlflow_models_serve", result["mlflow_models_serve"])))
        finally:
            stop(proc)

    print("\n| server | concurrency | images/s | model alone | ratio | p50 ms | p95 ms | p99 ms | statuses |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for key in ("mrcnn_serve_segment", "mrcnn_serve_invocations", "mlflow_models_serve"):
        print("\n".join(serve_rows(key, result.get(key, []))))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
