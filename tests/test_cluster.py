"""The training job on a Ray head started with `ray start`, and on a GPU. (Clusters of two hosts:
tests/test_two_hosts.py.)"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from tests.helpers.jobs import tiny
from tests.helpers.servers import ray_head
from workflows.jobs.train import run

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


def test_two_jobs_submitted_to_one_ray_head_at_once_one_crashing(gapped_shapes, tmp_path, monkeypatch):
    """Same head, same output folder, same MLflow store, default run names, submitted in the
    same second: each ends in its own MLflow run and its own checkpoint folder. One diverges
    (lr 1e12): its job fails, and its run ends FAILED with the error as a tag; the other
    finishes."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    db = tmp_path / "mlflow.db"  # new: both jobs create it at once
    overrides = [f"output_dir={tmp_path / 'out'}", f"data.root={gapped_shapes}", "data.generate=null",
                 "model.transform.min_size=[64]", "model.transform.max_size=64", "trainer.batch_size=2",
                 "trainer.epochs=1", "trainer.max_steps=2", "trainer.log_every_steps=1",
                 "trainer.max_failures=0", f"tracking.tracking_uri=sqlite:///{db}"]
    with ray_head(num_cpus=4) as head:
        client = JobSubmissionClient(head.dashboard)
        jobs = [submit(
            client, entrypoint=f"{BIN / 'mrcnn-train'} " + " ".join(f"'{o}'" for o in [*overrides, *extra]),
            runtime_env={"working_dir": str(REPO),
                         "excludes": ["/.venv", "/.git", "/outputs", "/data", "/benchmarks/results", "*.db"]},
        ) for extra in ([], ["trainer.optimizer.lr=1e12"])]
        deadline = time.time() + 600
        while not all(client.get_job_status(j).is_terminal() for j in jobs) and time.time() < deadline:
            time.sleep(3)
        (good, bad), logs = jobs, [client.get_job_logs(j) for j in jobs]
        assert client.get_job_status(good) == JobStatus.SUCCEEDED, logs[0][-3000:]
        assert "open the MLflow UI" in logs[0]
        assert client.get_job_status(bad) == JobStatus.FAILED and "loss is" in logs[1], logs[1][-3000:]
    mlflow = MlflowClient(f"sqlite:///{db}")
    runs = {r.info.status: r for r in mlflow.search_runs([mlflow.get_experiment_by_name("maskrcnn").experiment_id])}
    assert set(runs) == {"FINISHED", "FAILED"}
    assert runs["FINISHED"].data.tags["ray_run_name"] != runs["FAILED"].data.tags["ray_run_name"]
    assert "loss is" in runs["FAILED"].data.tags["error"], runs["FAILED"].data.tags
    finished = runs["FINISHED"]
    assert sorted(m.step for m in mlflow.get_metric_history(finished.info.run_id, "train/loss")) == [1, 2]
    assert "val/segm_AP" in finished.data.metrics
    folder = tmp_path / "out" / "ray_results" / finished.data.tags["ray_run_name"]
    assert len([d for d in folder.glob("checkpoint_*") if d.is_dir()]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_training_with_nccl_and_mixed_precision(gapped_shapes, tmp_path, precision):
    ray.shutdown()
    ray.init(num_gpus=1)
    try:
        cfg = tiny(tmp_path / "out", gapped_shapes, "trainer=gpu", "trainer.num_workers=1", "trainer.epochs=1",
                   "trainer.max_steps=3", "trainer.batch_size=2", "trainer.cpus_per_worker=1",
                   "trainer.log_every_steps=1", f"run_name=gpu-{precision}", f"trainer.precision={precision}")
        assert cfg.trainer.use_gpu is True
        result = run(cfg)
        assert result["metrics"]["step"] == 3
    finally:
        ray.shutdown()
