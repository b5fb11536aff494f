"""`mrcnn-serve` as a user runs it: a real process on 127.0.0.1 with its own Ray and Serve, a real
SQLite registry, real image files. Every wait is bounded; the server is stopped by its PID."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from tests.helpers.jobs import compose_job
from tests.helpers.processes import stopped_after
from tests.helpers.registry import assert_same_row, register_tiny_models
from tests.helpers.servers import free_port
from workflows.checks import validate
from workflows.config import with_values
from workflows.tracking import fluent_api_at, mlflow_client

REPO = Path(__file__).resolve().parents[1]
NAME = "shapes-serve"
TOKEN = "a-long-random-token"
LIMITS = "score_threshold=0.05&max_detections=20"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """shapes-serve versions 1 and 2 (different random weights), champion on 1."""
    uri, versions = register_tiny_models(tmp_path_factory.mktemp("serve-registry"), NAME, seeds=(0, 1))
    return {"uri": uri, "versions": versions}


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    tracking_uri: str

    def request(self, path: str, body: bytes | None = None, token: str | None = TOKEN,
                headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, Any, dict]:
        """(status, headers (case-insensitive), JSON body) of one request; an HTTP error status is
        returned, not raised."""
        headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers, json.loads(response.read())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = {"text": text.decode(errors="replace")}
            return e.code, e.headers, payload


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    """`mrcnn-serve` of shapes-serve@champion: a bearer token, a 1 MiB body limit, batches of up
    to 4, a replica taking 4 requests and its proxy queueing 4 more, the alias read twice a
    second, its counts logged every second."""
    out = tmp_path_factory.mktemp("serve-out")
    port = free_port()
    log = out / "serve.log"
    command = [str(Path(sys.executable).parent / "mrcnn-serve"), f"output_dir={out}",
               f"tracking.tracking_uri={registry['uri']}", f"serve.model=models:/{NAME}@champion",
               f"serve.port={port}", "serve.token_env=SERVE_TOKEN", "serve.max_body_mb=1",
               "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.05", "serve.max_ongoing_requests=4",
               "serve.max_queued_requests=4", "serve.follow_every_s=0.5", "serve.log_every_s=1"]
    env = {**os.environ, "SERVE_TOKEN": TOKEN}
    with stopped_after(), open(log, "wb") as sink:
        proc = subprocess.Popen(command, env=env, cwd=out, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while "serving models:/" not in log.read_text(errors="replace"):
                assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-5000:]
                time.sleep(0.5)
            yield Server(f"http://127.0.0.1:{port}", port, proc, log, registry["uri"])
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def images(gapped_shapes: Path) -> list[Path]:
    return sorted((gapped_shapes / "val").glob("*.jpg"))


def expected_rows(files: list[Path], tracking_uri: str, version: str) -> list[dict]:
    """The rows `mrcnn-infer` writes for these files: its predictor, the same limits."""
    from workflows.inference.pipeline import Predictor
    from workflows.registry import resolve_model

    cfg = compose_job(["infer.score_threshold=0.05", "infer.max_detections=20"])
    model = resolve_model(f"models:/{NAME}/{version}", tracking_uri, "infer.model")
    table = Predictor(model, tracking_uri, cfg.infer, cfg.data.s3)(pa.table({"path": [str(f) for f in files]}))
    return table.to_pylist()


@pytest.mark.slow
def test_rows_are_those_mrcnn_infer_writes_and_the_pyfunc_returns(server, registry, gapped_shapes):
    """POST /segment (raw bytes, and a multipart upload) answers each image with the row
    `mrcnn-infer` writes for it, version included; POST /invocations with MLflow's DataFrame JSON
    answers what the logged pyfunc predicts."""
    import mlflow

    files = images(gapped_shapes)
    want = expected_rows(files, server.tracking_uri, "1")
    assert any(r["boxes"] for r in want), "degenerate: no detections to compare"
    for path, expected in zip(files, want):
        status, headers, row = server.request(f"/segment?{LIMITS}", path.read_bytes())
        assert status == 200 and headers["X-Model-Version"] == "1", row
        assert set(row) == set(expected) and row["path"] is None
        assert (row["model"], row["model_version"]) == (f"models:/{NAME}/1", "1") == (expected["model"],
                                                                                       expected["model_version"])
        assert_same_row(row, expected)
    boundary = "mrcnnboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{files[0].name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + files[0].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, _, row = server.request(f"/segment?{LIMITS}", body,
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and row["path"] == files[0].name
    assert_same_row(row, want[0])

    frame = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f.read_bytes()).decode()]
                                                              for f in files]},
             "params": {"score_threshold": 0.05, "max_detections": 20}}
    status, headers, answer = server.request("/invocations", json.dumps(frame).encode(),
                                             headers={"Content-Type": "application/json"})
    assert status == 200 and headers["X-Model-Version"] == "1"
    with fluent_api_at(server.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    import pandas as pd

    predicted = pyfunc.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}),
                               params={"score_threshold": 0.05, "max_detections": 20}).to_dict("records")
    assert len(answer["predictions"]) == len(predicted) == len(files)
    for row, expected in zip(answer["predictions"], predicted):
        assert set(row) == set(expected)
        assert_same_row(row, expected)


@pytest.mark.slow
def test_bad_requests_get_a_clear_4xx(server, gapped_shapes):
    """A broken image: 400 with the error row; an empty body: 400; a body over serve.max_body_mb:
    413; no or a wrong token: 401 (the health check needs none); bad parameters and bodies: 400."""
    jpeg = images(gapped_shapes)[0].read_bytes()
    status, _, row = server.request("/segment", b"\x89PNG\r\n\x1a\n broken")
    assert status == 400 and "cannot decode" in row["error"] and row["boxes"] is None and row["model_version"] == "1"
    status, _, answer = server.request("/segment", b"")
    assert status == 400 and "empty body" in answer["error"]
    status, _, answer = server.request("/segment", jpeg + b"\0" * (2 * 2**20))
    assert status == 413 and "serve.max_body_mb=1" in answer["error"]
    for token in (None, "wrong"):
        status, headers, answer = server.request("/segment", jpeg, token=token)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and "bearer token" in answer["error"]
        assert server.request("/version", token=token)[0] == 401
    assert server.request("/healthz", token=None)[:3:2] == (200, {"status": "ok"})
    status, _, answer = server.request("/version")
    assert status == 200 and answer == {"model": f"models:/{NAME}@champion", "name": NAME, "version": "1",
                                        "uri": f"models:/{NAME}/1"}
    assert server.request("/segment?score_threshold=2", jpeg)[0] == 400
    status, _, answer = server.request("/invocations", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, _, answer = server.request("/invocations", json.dumps(
        {"dataframe_records": [{"path": "/etc/passwd"}]}).encode())
    assert status == 400 and "reads no files" in answer["error"]
    status, _, answer = server.request("/invocations", json.dumps(
        {"dataframe_records": [{"image": base64.b64encode(b"broken").decode()}]}).encode())
    assert status == 200 and "cannot decode" in answer["predictions"][0]["error"]  # as mlflow models serve


def run_metrics(server: Server) -> dict[str, float]:
    client = mlflow_client(server.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("maskrcnn").experiment_id],
                              filter_string="tags.job = 'serve'")
    assert len(runs) == 1
    return runs[0].data.metrics


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_overload_is_answered(server, gapped_shapes):
    """Four requests at once (what a replica takes) are predicted in batches larger than one (the
    run's batch sizes);
    sixty-four at once overflow 4 in the replica + 4 queued: the rest get 503 with Retry-After at
    once, none another 5xx, and the endpoint answers normally afterwards."""
    jpeg = images(gapped_shapes)[0].read_bytes()

    def burst(n: int) -> list[tuple[int, dict]]:
        start = threading.Barrier(n)

        def one(_):
            start.wait()
            status, headers, _ = server.request("/segment", jpeg)
            return status, headers

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    assert [s for s, _ in burst(4)] == [200] * 4
    deadline = time.time() + 30
    while run_metrics(server).get("serve/batch_size_max", 0) <= 1:
        assert time.time() < deadline, f"no batch above one image: {run_metrics(server)}"
        time.sleep(1)
    answers = burst(64)
    statuses = Counter(s for s, _ in answers)
    assert set(statuses) <= {200, 503} and statuses[503] > 0 and statuses[200] >= 4, statuses
    assert all(h.get("Retry-After") == "1" for s, h in answers if s == 503)
    assert server.request("/segment", jpeg)[0] == 200


@pytest.mark.slow
def test_the_alias_moves_under_load_without_a_failed_request(server, registry, gapped_shapes):
    """Four clients send requests back to back while champion moves to version 2: every request
    is answered 200, and each client sees version 1, then version 2 only (the header and the row)."""
    jpeg = images(gapped_shapes)[1].read_bytes()
    seen: list[list[tuple[int, str, str]]] = [[] for _ in range(4)]
    moved = threading.Event()

    def client(k: int) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            status, headers, row = server.request("/segment", jpeg)
            seen[k].append((status, headers.get("X-Model-Version"), row.get("model_version")))
            if moved.is_set() and sum(v == "2" for _, v, _ in seen[k]) >= 5:
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    mlflow_client(server.tracking_uri).set_registered_model_alias(NAME, "champion", registry["versions"][1])
    moved.set()
    for t in threads:
        t.join(timeout=150)
    for answers in seen:
        assert {s for s, _, _ in answers} == {200}, Counter(s for s, _, _ in answers)
        versions = [v for _, v, _ in answers]
        assert all(v == row for _, v, row in answers)
        assert versions[0] == "1" and versions[-1] == "2" and versions == sorted(versions), versions
    assert server.request("/version")[2]["version"] == "2"


@pytest.mark.slow
def test_sigterm_takes_the_application_down_and_ends_the_run(server):
    """SIGTERM (what Ctrl-C, `ray job stop` and Kubernetes send): the process exits 0 within a
    minute, the port is closed, and the MLflow run is FINISHED with the versions served, the
    request counts and the latency percentiles."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=90) == 0, server.log.read_text(errors="replace")[-5000:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    client = mlflow_client(server.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("maskrcnn").experiment_id],
                             filter_string="tags.job = 'serve'")[0]
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags["served_versions"]) == ["1", "2"]
    m = run.data.metrics
    assert m["serve/model_version"] == 2 and m["serve/2xx"] >= 20 and m["serve/4xx"] >= 5
    assert 0 < m["serve/latency_p50_ms"] <= m["serve/latency_p95_ms"] <= m["serve/latency_p99_ms"]
    assert run.data.params["serve.max_batch_size"] == "4"
    assert "requests; latency p50" in server.log.read_text(errors="replace")


def test_the_rayservice_manifest_builds_the_application(registry):
    """deploy/rayservice.yaml's Serve config: its import path and Hydra overrides build the
    application (with the registry here) that `mrcnn-serve` deploys, on the pinned Ray."""
    import re

    from ray.serve.config import BackpressureConfig

    from workflows.serving import app as serving

    manifest = yaml.safe_load((REPO / "deploy/rayservice.yaml").read_text())
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, _, builder = application["import_path"].partition(":")
    assert module == serving.__name__ and builder == "build_app"
    overrides = application["args"]["overrides"]
    cfg = compose_job(overrides)
    validate(cfg, "serve")
    assert cfg.serve.num_gpus == 1 and cfg.serve.token_env and cfg.tracking.tracking_uri.startswith("http")
    os.environ[cfg.serve.token_env] = TOKEN
    try:
        app = serving.build_app({"overrides": [*overrides, f"tracking.tracking_uri={registry['uri']}",
                                               f"serve.model=models:/{NAME}/1"]})
    finally:
        del os.environ[cfg.serve.token_env]
    segmenter = app._bound_deployment
    deployed, follower = segmenter.init_args
    assert deployed.model.uri == f"models:/{NAME}/1" and deployed.token_sha256 == serving.token_digest(TOKEN)
    assert segmenter.ray_actor_options["num_gpus"] == 1 and segmenter.max_queued_requests == 128
    assert segmenter._deployment_config.autoscaling_config.max_replicas == 8
    assert segmenter.backpressure_config == BackpressureConfig(status_code=503, retry_after_s=1)
    assert follower._bound_deployment.name == "ModelFollower"
    pinned = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<', (REPO / "pyproject.toml").read_text()).group(1)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"].startswith(f"{pinned}.")


@pytest.mark.parametrize("override,message", [
    (["serve.max_ongoing_requests=2"], "serve.max_ongoing_requests=2 caps each batch"),
    (["serve.overload_status=500"], "must be 429 or 503"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], "serve.min_replicas=3 is above"),
    (["serve.precision=fp16"], "serve.precision=fp16 needs CUDA"),
    (["serve.max_queued_requests=0"], "serve.max_queued_requests=0 must be > 0"),
])
def test_bad_serve_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_job(override), "serve")


def test_an_unset_token_variable_stops_the_job_before_ray(registry, tmp_path):
    """serve.token_env names a variable that is not set: the job stops before Ray, saying so."""
    from workflows.jobs import serve as job

    cfg = with_values(compose_job([f"output_dir={tmp_path}", f"tracking.tracking_uri={registry['uri']}",
                                   f"serve.model=models:/{NAME}@champion"]),
                      {"serve.token_env": "MRCNN_TEST_NO_SUCH_VARIABLE"})
    with pytest.raises(ValueError, match="MRCNN_TEST_NO_SUCH_VARIABLE is not set"):
        job.run(cfg)
    import ray

    assert not ray.is_initialized()
