"""The frame every job runs inside: run names, and the MLflow run's status when a job ends."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.jobs import compose_job
from workflows.jobs.frame import Job, JobInterrupted, new_run_name


def frame(tmp_path, kind: str = "evaluate") -> Job:
    return Job(compose_job([f"output_dir={tmp_path / 'out'}", f"data.root={tmp_path / 'data'}"]), kind)


def test_run_names_are_readable_and_unique_within_a_second():
    names = {new_run_name("sweep") for _ in range(50)}
    assert len(names) == 50  # 24 random bits: a clash among 50 has odds under 1e-4
    assert all(re.fullmatch(r"sweep-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)


@pytest.mark.parametrize("error,status", [
    (None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
    (JobInterrupted("stopped by SIGTERM"), "KILLED"),
])
def test_the_run_ends_finished_failed_or_killed(tmp_path, capsys, error, status):
    job = frame(tmp_path)
    with pytest.raises(type(error)) if error else _nothing(), job:
        run_id = job.open_run("evaluate", {"split": "val"})
        assert MlflowClient(job.tracking_uri).get_run(run_id).info.status == "RUNNING"
        if error:
            raise error
    run = MlflowClient(job.tracking_uri).get_run(run_id)
    assert run.info.status == status
    assert run.data.tags["job"] == "evaluate" and run.data.tags["log_file"] == str(job.log_file)
    if error:
        assert run.data.tags["error"] == f"{type(error).__name__}: {error}"
        assert type(error).__name__ in job.log_file.read_text()  # the traceback is in the job's log
    else:
        assert "error" not in run.data.tags
    printed = capsys.readouterr().out
    assert run_id in printed and f"MLflow run {job.run_name}" in printed
    # The log holds what the console showed, and the console is itself again.
    assert f"MLflow run {job.run_name}" in job.log_file.read_text()
    print("after the job")
    assert "after the job" not in job.log_file.read_text()


def test_sigterm_to_the_process_ends_the_run_killed(tmp_path):
    """A real SIGTERM (what `ray job stop` and Kubernetes send) reaches the job's handler: the job
    raises JobInterrupted, its run ends KILLED, and the process's own handler is back after."""
    import os
    import signal
    import time

    job = frame(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobInterrupted, match="SIGTERM"), job:
        run_id = job.open_run("evaluate", {"split": "val"})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, in the main thread
    assert MlflowClient(job.tracking_uri).get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failure_before_the_run_opens_records_nothing(tmp_path):
    job = frame(tmp_path)
    with pytest.raises(ValueError, match="bad data"), job:
        raise ValueError("bad data")
    client = MlflowClient(job.tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_invalid_values_are_all_named_at_once(tmp_path):
    cfg = compose_job([f"output_dir={tmp_path}", "trainer.batch_size=0", "trainer.optimizer.lr=-1",
                       "data.augment.hflip_prob=2"])
    with pytest.raises(ValueError) as e, Job(cfg, "train"):
        pass
    for key in ("trainer.batch_size=0", "trainer.optimizer.lr=-1", "data.augment.hflip_prob"):
        assert key in str(e.value)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
