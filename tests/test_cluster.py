"""The training job on real Ray clusters: a head started with `ray start` and a two-node cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from helpers.jobs import compose_job, tiny
from helpers.servers import ray_head
from mlflow.tracking import MlflowClient

from workflows.train import run

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def submit(client, **job) -> str:
    """Submit, retrying while a just-started head has no job agent yet (Ray: "try again later")."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def test_two_jobs_submitted_to_one_ray_head_at_once(gapped_shapes, tmp_path, monkeypatch):
    """Same head, same output folder, same MLflow store, default run names, submitted in the
    same second: each finishes in its own MLflow run and its own checkpoint folder."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    db = tmp_path / "mlflow.db"
    overrides = [f"output_dir={tmp_path / 'out'}", f"data.root={gapped_shapes}", "data.generate=null",
                 "model.transform.min_size=[64]", "model.transform.max_size=64", "trainer.batch_size=2",
                 "trainer.epochs=1", "trainer.max_steps=2", "trainer.log_every_steps=1",
                 f"tracking.tracking_uri=sqlite:///{db}"]
    with ray_head(num_cpus=4) as dashboard:
        client = JobSubmissionClient(dashboard)
        jobs = [submit(
            client, entrypoint=f"{BIN / 'mrcnn-train'} " + " ".join(f"'{o}'" for o in overrides),
            runtime_env={"working_dir": str(REPO),
                         "excludes": ["/.venv", "/.git", "/outputs", "/data", "/benchmarks/results", "*.db"]},
        ) for _ in range(2)]
        deadline = time.time() + 600
        while not all(client.get_job_status(j).is_terminal() for j in jobs) and time.time() < deadline:
            time.sleep(3)
        for job in jobs:
            logs = client.get_job_logs(job)
            assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
            assert "open the MLflow UI" in logs
    mlflow = MlflowClient(f"sqlite:///{db}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("maskrcnn").experiment_id])
    assert len(runs) == 2 and len({r.data.tags["ray_run_name"] for r in runs}) == 2
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in mlflow.get_metric_history(r.info.run_id, "train/loss")) == [1, 2]
        assert "val/segm_AP" in r.data.metrics
        folder = tmp_path / "out" / "ray_results" / r.data.tags["ray_run_name"]
        assert len([d for d in folder.glob("checkpoint_*") if d.is_dir()]) == 1


def test_two_node_cluster_trains_and_segments_on_both_nodes(gapped_shapes, tmp_path):
    """One training worker on each node (STRICT_SPREAD), then `mrcnn-infer` with the model it
    wrote: one predictor actor on each node, every image one row."""
    import pyarrow.parquet as pq
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from workflows import infer

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True})
    cluster.add_node(num_cpus=2)
    pythonpath = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        cfg = tiny(tmp_path / "out", gapped_shapes, "trainer.num_workers=2", "trainer.epochs=1",
                   "trainer.max_steps=2", "trainer.placement_strategy=STRICT_SPREAD", "run_name=two-nodes")
        result = run(cfg)
        tags = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).data.tags
        nodes = tags["ray.worker_nodes"].split(",")
        assert len(nodes) == 2 and len(set(nodes)) == 2
        assert set(nodes) <= {n["NodeID"] for n in ray.nodes()}
        assert result["metrics"]["step"] == 2

        out = tmp_path / "rows"
        infer.run(compose_job([f"output_dir={tmp_path / 'out'}", f"infer.input={gapped_shapes / 'val'}",
                               f"infer.output={out}", f"infer.model={result['checkpoint']}", "infer.overlays=0",
                               "infer.concurrency=2", "infer.cpus_per_actor=1.5",  # one predictor a node
                               "infer.batch_size=2", "infer.rows_per_file=2"]))
        actors = [a for a in list_actors(detail=True, limit=1000) if "Predictor" in (a.class_name or "")]
        assert len({a.node_id for a in actors}) == 2, [(a.class_name, a.node_id) for a in actors]
        paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
        assert sorted(paths) == sorted(str(p) for p in (gapped_shapes / "val").glob("*.jpg"))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_node_that_does_not_share_a_local_path_stops_the_job_before_work(gapped_shapes, tmp_path):
    """A second node in a mount namespace of its own, where the job's output folder is another
    (empty) tmpfs: `mrcnn-train` with that local output_dir and the SQLite store in it stops
    before any work, naming both keys and what to set. (Nodes that share the disk pass the same
    check: test_two_node_cluster_trains_and_segments_on_both_nodes.)"""
    from helpers.servers import free_port, kill_processes_mentioning

    ray.shutdown()
    private = Path(tempfile.mkdtemp(prefix="np", dir="/tmp"))
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = BIN / "ray"
    node_b = None
    try:
        subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
                        "--temp-dir", temp], env=env, check=True, capture_output=True)
        node_b = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs tmpfs {private} && exec {ray_bin} start --address 127.0.0.1:{port} "
             "--node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats --block"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline and node_b.poll() is None, "the second node did not join"
            time.sleep(1)
        out = private / "out"
        cfg = tiny(out, gapped_shapes, "trainer.epochs=1", f"ray_address=127.0.0.1:{port}")
        with pytest.raises(ValueError) as refused:
            run(cfg)
        message = str(refused.value)
        assert re.search(rf"output_dir={out} is a local path that node\(s\) \S+ do not share", message), message
        assert "output_dir=s3://bucket/prefix" in message
        assert f"tracking.tracking_uri=sqlite:///{out}/mlflow.db is a local path" in message
        assert "data.root" not in message  # the dataset folder is shared
        assert not (out / "ray_results").exists() and not list(out.glob(".node-check-*"))
    finally:
        ray.shutdown()
        kill_processes_mentioning(temp, str(port))
        if node_b is not None:
            node_b.kill()
            node_b.wait()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_training_with_nccl_and_amp(gapped_shapes, tmp_path):
    ray.shutdown()
    ray.init(num_gpus=1)
    try:
        cfg = tiny(tmp_path / "out", gapped_shapes, "trainer=gpu", "trainer.num_workers=1", "trainer.epochs=1",
                   "trainer.max_steps=3", "trainer.batch_size=2", "trainer.cpus_per_worker=1",
                   "trainer.log_every_steps=1", "run_name=gpu")
        assert cfg["trainer"]["amp"] is True
        result = run(cfg)
        assert result["metrics"]["step"] == 3
    finally:
        ray.shutdown()
