"""The training job on a Ray head started with `ray start`, and on a GPU. (Clusters of two hosts:
tests/test_two_hosts.py.)"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray
from helpers.jobs import tiny
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
