"""The MLflow server going away while a job runs: training goes on, the history arrives when the
server is back, and what never arrived is named."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from helpers.jobs import tiny
from helpers.servers import free_port, mlflow_server

from workflows.tracking import RunLogger, experiment_id, mlflow_client
from workflows.train import run


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
def test_training_goes_on_through_an_outage_and_its_history_is_complete(ray_local, gapped_shapes, tmp_path):
    """The server is stopped once the first step is logged and started again 10 s later (12 short
    epochs: training outlasts the outage): the job finishes, and its run holds every step and the
    evaluation. One training image cannot be decoded: it is skipped, and counted each epoch."""
    data = tmp_path / "corrupt"
    shutil.copytree(gapped_shapes, data)
    (data / "train/000003.jpg").write_bytes(b"not a jpeg at all")
    root, port = tmp_path / "mlflow", free_port()
    url = f"http://127.0.0.1:{port}"
    outage = {}

    def first_step_logged() -> bool:
        client = mlflow_client(url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return bool(runs and steps(client, runs[0].info.run_id, "train/loss"))

    def stop_and_restart(server):
        wait_for(first_step_logged, 300, "the first logged step")
        server.__exit__(None, None, None)
        outage["down"] = time.time()
        time.sleep(10)
        outage["up"] = time.time()
        outage["back"] = mlflow_server(root, port)
        outage["back"].__enter__()

    first = mlflow_server(root, port)
    first.__enter__()
    watcher = threading.Thread(target=stop_and_restart, args=(first,), daemon=True)
    watcher.start()
    try:
        result = run(tiny(tmp_path / "out", data, f"tracking.tracking_uri={url}", "trainer.epochs=12",
                          "trainer.eval_every_epochs=6", "run_name=outage"))
        watcher.join(120)
        assert "down" in outage, "the server was never stopped: the test did not test anything"
        assert "mlflow_unlogged" not in result["metrics"]
        client = mlflow_client(url)
        total = result["metrics"]["step"]
        assert steps(client, result["run_id"], "train/loss") == list(range(1, total + 1))
        assert len(steps(client, result["run_id"], "train/epochs_completed")) == 12
        assert total == 12 * 4  # the 7 good images in batches of 2
        skipped = client.get_metric_history(result["run_id"], "train/images_skipped")
        assert len(skipped) == 12 and {m.value for m in skipped} == {1}
        # Steps trained while the server was away arrived later, stamped with when they ran.
        during = [m for m in client.get_metric_history(result["run_id"], "train/loss")
                  if outage["down"] * 1000 < m.timestamp < outage["up"] * 1000]
        assert during, "no step ran during the outage"
        assert "val/segm_AP" in client.get_run(result["run_id"]).data.metrics
        assert client.get_run(result["run_id"]).info.status == "FINISHED"
    finally:
        watcher.join(120)
        if "back" in outage:
            outage["back"].__exit__(None, None, None)
        elif "down" not in outage:
            first.__exit__(None, None, None)
