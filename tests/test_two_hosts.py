"""A Ray cluster of two hosts that share nothing but the installed code (network namespaces on a
bridge, each host with a private /tmp): data, checkpoints and rows in a bucket, tracking on an
MLflow server, both on the bridge's address; jobs submitted as a user would, with `ray job
submit` and the bucket's credentials in the job's runtime environment."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.hosts import can_make_hosts, two_hosts
from helpers.s3server import CREDENTIALS, create_bucket, s3_server, upload_folder
from helpers.servers import mlflow_server, wait_http
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
WHY_NOT = can_make_hosts()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]
TINY = ["data.generate=null", "model.transform.min_size=[64]", "model.transform.max_size=64",
        "trainer.batch_size=2", "trainer.log_every_steps=1", "trainer.optimizer.warmup_steps=2",
        "trainer.torch_threads=1", "tracking.log_images=1"]


def submit_and_wait(client, command: str, overrides: list[str], env_vars: dict[str, str], timeout: float = 600):
    """`ray job submit` of a console script; returns (status, logs)."""
    from ray.job_submission import JobStatus

    entrypoint = f"{BIN / command} " + " ".join(f"'{o}'" for o in overrides)
    deadline = time.time() + 120
    while True:  # a head that just started may have no job agent yet
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env_vars})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + timeout
    while not client.get_job_status(job).is_terminal():
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    status = client.get_job_status(job)
    return status == JobStatus.SUCCEEDED, client.get_job_logs(job)


def test_two_hosts_train_resume_and_segment_through_a_bucket(tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    from mrcnn.data.shapes import write_shapes_dataset
    from workflows.storage import list_files, read_bytes

    shapes = write_shapes_dataset(tmp_path / "shapes", train=8, val=4, size=64, seed=1)
    with two_hosts() as (bridge, a, b), s3_server(bridge) as endpoint, \
            mlflow_server(tmp_path / "mlflow", host=bridge) as tracking:
        upload_folder(endpoint, "data", shapes, "shapes")
        create_bucket(endpoint, "runs")
        aws = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        for key, value in aws.items():
            monkeypatch.setenv(key, value)  # this process reads the bucket too
        # Both hosts carry this machine's hostname, which resolves to 127.0.0.1: gloo is told the
        # interface, as on any cluster whose hostnames do not resolve to the nodes' own addresses.
        job_env = {**aws, "GLOO_SOCKET_IFNAME": "e0"}
        # The hosts' Ray knows nothing of the bucket: the credentials travel with each job.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING"))}
        env["RAY_AUTH_MODE"] = "disabled"
        a.start(f"{BIN / 'ray'} start --head --node-ip-address {a.address} --port 6379 --dashboard-host 0.0.0.0 "
                "--dashboard-port 8265 --num-cpus 2 --disable-usage-stats --block", env, str(tmp_path / "a.log"))
        dashboard = f"http://{a.address}:8265"
        wait_http(f"{dashboard}/api/version", timeout=180)
        b.start(f"{BIN / 'ray'} start --address {a.address}:6379 --node-ip-address {b.address} --num-cpus 2 "
                "--disable-usage-stats --block", env, str(tmp_path / "b.log"))
        deadline = time.time() + 120
        while len([n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]) < 2:
            assert time.time() < deadline, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(2)
        client = JobSubmissionClient(dashboard)
        common = ["output_dir=s3://runs/out", f"tracking.tracking_uri={tracking}"]

        # Training with one worker on each host; checkpoints into the bucket.
        train = [*common, "data.root=s3://data/shapes", *TINY, "trainer.epochs=2", "trainer.num_workers=2",
                 "trainer.cpus_per_worker=1", "trainer.placement_strategy=STRICT_SPREAD",
                 "tracking.registered_model=two-hosts", "run_name=two-hosts"]
        ok, logs = submit_and_wait(client, "mrcnn-train", train, job_env)
        assert ok, logs[-3000:]
        mlflow = MlflowClient(tracking)
        exp = mlflow.get_experiment_by_name("maskrcnn").experiment_id
        (run,) = mlflow.search_runs([exp], filter_string="tags.ray_run_name = 'two-hosts'")
        nodes = run.data.tags["ray.worker_nodes"].split(",")
        assert len(nodes) == 2 and len(set(nodes)) == 2
        assert "val/segm_AP" in run.data.metrics and run.info.status == "FINISHED"
        steps = sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss"))
        # Every image once an epoch across the two workers, and every step logged once. (The
        # split is dynamic, `equal=False`: a worker may take more than half of an epoch.)
        assert run.data.metrics["train/images_skipped"] == 0
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4, steps
        stored = list_files("s3://runs/out/ray_results/two-hosts")
        assert any(f.endswith("/checkpoint.pt") for f in stored), stored

        # The same command again: resumed from the bucket, nothing trained twice.
        ok, logs = submit_and_wait(client, "mrcnn-train", train, job_env)
        assert ok and "resumed from epoch 1" in logs, logs[-3000:]
        assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "train/loss")) == steps

        # Segmenting from the bucket into the bucket, one predictor on each host.
        infer = [*common, "infer.input=s3://data/shapes/val", "infer.output=s3://runs/rows",
                 "infer.model=models:/two-hosts@candidate", "infer.concurrency=2", "infer.cpus_per_actor=1.5",
                 "infer.batch_size=2", "infer.rows_per_file=2", "infer.overlays=0", "infer.torch_threads=1"]
        ok, logs = submit_and_wait(client, "mrcnn-infer", infer, aws)
        assert ok and "segmented 4 images" in logs, logs[-3000:]
        predictors = [x for x in list_actors(address=dashboard, detail=True, limit=1000)
                      if "Predictor" in (x.class_name or "")]
        assert len({x.node_id for x in predictors}) == 2, [(x.class_name, x.node_id) for x in predictors]
        paths = [p for f in list_files("s3://runs/rows", suffixes=(".parquet",))
                 for p in pq.read_table(io.BytesIO(read_bytes(f))).column("path").to_pylist()]
        assert sorted(paths) == sorted(f"s3://data/shapes/val/{p.name}" for p in (shapes / "val").glob("*.jpg"))

        # Neither host's disk holds checkpoints, rows or tracking files.
        for host in (a, b):
            found = host.run("find /tmp -name checkpoint.pt -o -name '*.parquet' -o -name 'mlflow.db'", env)
            assert found.returncode == 0 and found.stdout.strip() == "", (host.name, found.stdout, found.stderr)

        # A local output folder (and the SQLite store in it) on this cluster: refused before any work.
        ok, logs = submit_and_wait(client, "mrcnn-train", ["output_dir=/tmp/local-out", "data.root=s3://data/shapes",
                                                            *TINY, "run_name=local"], aws)
        assert not ok
        assert "output_dir=/tmp/local-out is a local path that node(s)" in logs, logs[-3000:]
        assert "tracking.tracking_uri=sqlite:////tmp/local-out/mlflow.db is a local path" in logs
