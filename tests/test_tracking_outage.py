"""The MLflow server going away while a job runs: training goes on, the history arrives when the
server is back, and what never arrived is named."""

from __future__ import annotations

import shutil
import threading
import time
import traceback

import numpy as np
import pytest

from tests.helpers.jobs import tiny
from tests.helpers.servers import free_port, mlflow_server
from workflows.jobs.train import run
from workflows.tracking import RunLogger, experiment_id, mlflow_client


@pytest.fixture
def quick_failing_requests(monkeypatch):
    # What RunLogger sets in a training worker, kept out of the other tests' environment.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_logger_keeps_writes_while_the_server_is_away_and_sends_them_when_it_is_back(
        tmp_path, quick_failing_requests):
    root, port = tmp_path / "mlflow", free_port()
    with mlflow_server(root, port) as url:
        client = mlflow_client(url)
        run_id = client.create_run(experiment_id(client, url, "outage")).info.run_id
        logger = RunLogger(url, run_id, retry_s=0.5)
        logger.log_metrics({"loss": 1.0}, 1)
        wait_for(lambda: steps(client, run_id, "train/loss") == [1], 30, "the first write")
    t0 = time.time()
    for step in range(2, 6):
        logger.log_metrics({"loss": 1.0 / step, "segm_AP": 0.1 * step, "images_per_s": 3.0}, step)
    logger.log_image(np.zeros((8, 8, 3), np.uint8), "predictions/epoch_000/7.png")
    assert time.time() - t0 < 0.5  # the caller (a training step) never waits for the server
    wait_for(lambda: logger.down, 30, "the logger to notice the outage")
    with mlflow_server(root, port):
        assert logger.close(timeout=60) == []
        assert steps(client, run_id, "train/loss") == [1, 2, 3, 4, 5]
        assert steps(client, run_id, "val/segm_AP") == [2, 3, 4, 5]
        assert steps(client, run_id, "system/images_per_s") == [2, 3, 4, 5]
        assert [f.path for f in client.list_artifacts(run_id, "predictions/epoch_000")] == \
            ["predictions/epoch_000/7.png"]


def test_logger_names_what_it_could_not_send(quick_failing_requests):
    logger = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, retry_s=0.5)  # no server there
    logger.log_metrics({"loss": 0.5}, 10)
    logger.log_image(np.zeros((8, 8, 3), np.uint8), "predictions/epoch_001/3.png")
    unsent = logger.close(timeout=2)
    assert unsent == ["train/loss @ step 10", "image predictions/epoch_001/3.png"]


@pytest.mark.slow
def test_training_goes_on_through_an_outage_and_a_killed_worker_and_its_history_is_complete(
        ray_local, gapped_shapes, tmp_path):
    """The server is stopped once the first step is logged and started again 10 s later; once it
    has every step up to a checkpoint Ray Train recorded after that, this job's training worker is
    SIGKILLed, and Ray Train restarts it from there (a new worker process, the run tagged with the
    resume). The job finishes into the same MLflow run with every step and evaluation logged once,
    none missing. One training image cannot be decoded: it is skipped, and counted each epoch."""
    import contextlib
    import signal

    import psutil

    from mrcnn.checkpoint import checkpoint_step

    data = tmp_path / "corrupt"
    shutil.copytree(gapped_shapes, data)
    (data / "train/000003.jpg").write_bytes(b"not a jpeg at all")
    root, port = tmp_path / "mlflow", free_port()
    url = f"http://127.0.0.1:{port}"
    folder = tmp_path / "out" / "ray_results" / "outage"
    events: dict = {}

    def logged_steps() -> list[int]:
        client = mlflow_client(url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return steps(client, runs[0].info.run_id, "train/loss") if runs else []

    def recorded_step() -> int | None:
        """The step of the newest checkpoint Ray Train has recorded, once it is after the outage."""
        snapshot = folder / "checkpoint_manager_snapshot.json"
        if not snapshot.exists() or "checkpoint_" not in snapshot.read_text():
            return None
        try:  # Ray Train deletes checkpoints beyond the ones it keeps
            newest = max(folder.glob("checkpoint_*/checkpoint.pt"), key=lambda f: f.stat().st_mtime)
            return checkpoint_step(newest) if newest.stat().st_mtime > events["up"] else None
        except (OSError, ValueError):
            return None

    def outage_then_kill(server):
        try:
            _outage_then_kill(server)
        except BaseException:  # noqa: BLE001 - reported by the test, not lost with the thread
            events["error"] = traceback.format_exc()
            raise

    def _outage_then_kill(server):
        wait_for(lambda: bool(logged_steps()), 300, "the first logged step")
        server.__exit__(None, None, None)
        events["down"] = time.time()
        time.sleep(10)
        events["up"] = time.time()
        events["back"] = mlflow_server(root, port)
        events["back"].__enter__()

        def caught_up() -> bool:  # what the worker to be killed logged before its checkpoint is in
            step = recorded_step()
            return step is not None and set(range(1, step + 1)) <= set(logged_steps())

        wait_for(caught_up, 300, "a checkpoint after the outage with every step before it logged")
        # This test's own Ray instance runs under this process: its workers are descendants.
        victims = [p for p in psutil.Process().children(recursive=True)
                   if any("RayTrainWorker" in part for part in _cmdline(p))]
        assert len(victims) == 1, victims
        victims[0].send_signal(signal.SIGKILL)
        events["killed"] = time.time()

    def _cmdline(p) -> list[str]:
        with contextlib.suppress(psutil.Error):
            return p.cmdline()
        return []

    first = mlflow_server(root, port)
    first.__enter__()
    watcher = threading.Thread(target=outage_then_kill, args=(first,), daemon=True)
    watcher.start()
    try:
        result = run(tiny(tmp_path / "out", data, f"tracking.tracking_uri={url}", "trainer.epochs=12",
                          "trainer.eval_every_epochs=6", "trainer.max_failures=1", "run_name=outage"))
        watcher.join(120)
        assert "error" not in events, events.get("error")
        assert "down" in events, "the server was never stopped: the test did not test anything"
        assert "killed" in events, "the worker was never killed: the job ended first"
        assert "mlflow_unlogged" not in result["metrics"]
        client = mlflow_client(url)
        run_ = client.get_run(result["run_id"])
        assert run_.info.status == "FINISHED" and "val/segm_AP" in run_.data.metrics
        assert run_.data.tags["resumed_from"].startswith("epoch "), run_.data.tags
        total = result["metrics"]["step"]
        assert total == 12 * 4  # the 7 good images in batches of 2
        # The steps redone after the restart are in the history once; none is missing.
        assert steps(client, result["run_id"], "train/loss") == list(range(1, total + 1))
        assert len(steps(client, result["run_id"], "train/epochs_completed")) == 12
        assert len(steps(client, result["run_id"], "val/segm_AP")) == 2
        skipped = client.get_metric_history(result["run_id"], "train/images_skipped")
        assert len(skipped) == 12 and {m.value for m in skipped} == {1}
        # Steps trained while the server was away arrived later, stamped with when they ran.
        during = [m for m in client.get_metric_history(result["run_id"], "train/loss")
                  if events["down"] * 1000 < m.timestamp < events["up"] * 1000]
        assert during, "no step ran during the outage"
    finally:
        watcher.join(120)
        if "back" in events:
            events["back"].__exit__(None, None, None)
        elif "down" not in events:
            first.__exit__(None, None, None)
