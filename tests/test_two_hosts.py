"""A Ray cluster of two hosts that share nothing but the installed code (network namespaces on a
bridge, each host with a private /tmp): data, checkpoints and rows in a bucket, tracking on an
MLflow server, both on the bridge's address; jobs submitted as a user would, with `ray job
submit` and the bucket's credentials in the job's runtime environment."""

from __future__ import annotations

import csv
import io
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers.hosts import can_make_hosts, two_hosts
from tests.helpers.s3server import CREDENTIALS, create_bucket, s3_server, upload_folder
from tests.helpers.servers import mlflow_server, wait_http

BIN = Path(sys.executable).parent
WHY_NOT = can_make_hosts()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]
TINY = ["data.generate=null", "model.transform.min_size=[64]", "model.transform.max_size=64",
        "trainer.batch_size=2", "trainer.log_every_steps=1", "trainer.optimizer.warmup_steps=2",
        "trainer.torch_threads=1", "tracking.log_images=1"]


def submit(client, command: str, overrides: list[str], env_vars: dict[str, str]) -> str:
    """`ray job submit` of a console script; returns the job's id."""
    entrypoint = f"{BIN / command} " + " ".join(f"'{o}'" for o in overrides)
    deadline = time.time() + 120
    while True:  # a head that just started may have no job agent yet
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env_vars})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def wait(client, job: str, timeout: float = 600):
    """The job's end: (its status, its logs)."""
    deadline = time.time() + timeout
    while not client.get_job_status(job).is_terminal():
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    return client.get_job_status(job), client.get_job_logs(job)


def submit_and_wait(client, command: str, overrides: list[str], env_vars: dict[str, str], timeout: float = 600):
    """(whether it succeeded, its logs)."""
    from ray.job_submission import JobStatus

    status, logs = wait(client, submit(client, command, overrides, env_vars), timeout)
    return status == JobStatus.SUCCEEDED, logs


def test_two_hosts_train_lose_a_host_resume_segment_and_sweep_through_a_bucket(tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    from mrcnn.data.images import decode_image
    from mrcnn.data.shapes import write_shapes_dataset
    from workflows.logged_model import load_model
    from workflows.storage import exists, list_files, read_bytes, remove

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
        # Serve's proxies send to their own node's replicas when they have one: host A's proxy is
        # to spread requests over both hosts (as one in front of a cluster's replicas would).
        env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
        a.start(f"{BIN / 'ray'} start --head --node-ip-address {a.address} --port 6379 --dashboard-host 0.0.0.0 "
                "--dashboard-port 8265 --num-cpus 3 --disable-usage-stats --block", env, str(tmp_path / "a.log"))
        dashboard = f"http://{a.address}:8265"
        wait_http(f"{dashboard}/api/version", timeout=180)
        join_b = (f"{BIN / 'ray'} start --address {a.address}:6379 --node-ip-address {b.address} --num-cpus 3 "
                  "--disable-usage-stats --block")
        b.start(join_b, env, str(tmp_path / "b.log"))
        deadline = time.time() + 120
        while len([n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]) < 2:
            assert time.time() < deadline, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(2)
        client = JobSubmissionClient(dashboard)
        common = ["output_dir=s3://runs/out", f"tracking.tracking_uri={tracking}"]

        # Training with one worker on each host, checkpoints into the bucket. Once Ray Train has
        # recorded a checkpoint and a step after it is logged, host B goes away (every process of
        # it killed) and comes back with a fresh disk: the job recovers from the bucket's checkpoint.
        train = [*common, "data.root=s3://data/shapes", *TINY, "trainer.epochs=6", "trainer.num_workers=2",
                 "trainer.cpus_per_worker=1", "trainer.placement_strategy=STRICT_SPREAD", "trainer.max_failures=3",
                 "trainer.eval_every_epochs=6", "tracking.registered_model=two-hosts", "run_name=two-hosts"]
        folder = "s3://runs/out/ray_results/two-hosts"
        snapshot = f"{folder}/checkpoint_manager_snapshot.json"
        mlflow = MlflowClient(tracking)
        job = submit(client, "mrcnn-train", train, job_env)

        def history(key: str) -> list[int]:
            """The steps of `key` in the run's history."""
            found = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                       filter_string="tags.ray_run_name = 'two-hosts'")
            return sorted(m.step for m in mlflow.get_metric_history(found[0].info.run_id, key)) if found else []

        deadline = time.time() + 500
        while True:  # an epoch's checkpoint (saved every epoch) recorded, and a step after it logged
            assert time.time() < deadline and not client.get_job_status(job).is_terminal(), \
                client.get_job_logs(job)[-3000:]
            epochs = history("train/epochs_completed")
            recorded = exists(snapshot) and b"checkpoint_" in read_bytes(snapshot)
            if epochs and recorded and history("train/loss")[-1] > epochs[-1]:
                break
            time.sleep(0.5)
        b.stop()
        b.start(join_b, env, str(tmp_path / "b.log"))

        # Once the job has recovered ("resumed from epoch" from the restarted workers) and Ray
        # Train has recorded a checkpoint since: `ray job stop`. The job ends STOPPED, its run KILLED.
        recorded_then = None
        while recorded_then is None or read_bytes(snapshot) == recorded_then:
            assert time.time() < deadline and not client.get_job_status(job).is_terminal(), \
                client.get_job_logs(job)[-3000:]
            if recorded_then is None and "resumed from epoch" in client.get_job_logs(job):
                recorded_then = read_bytes(snapshot)
            time.sleep(0.5)
        client.stop_job(job)
        status, logs = wait(client, job)
        assert status == JobStatus.STOPPED and "MLflow run two-hosts (KILLED)" in logs, logs[-3000:]
        exp = mlflow.get_experiment_by_name("maskrcnn").experiment_id
        (run,) = mlflow.search_runs([exp], filter_string="tags.ray_run_name = 'two-hosts'")
        assert run.info.status == "KILLED"

        # The same command again resumes into the same run from the newest checkpoint in the
        # bucket, also without Ray Train's record of it (removed here, as when a driver killed
        # outright dies between a worker writing a checkpoint and Ray Train recording it).
        newest = sorted(f for f in list_files(folder) if f.endswith("/checkpoint.pt"))[-1]
        remove(snapshot)
        ok, logs = submit_and_wait(client, "mrcnn-train", train, job_env)
        assert ok and f"{newest} is newer than any checkpoint Ray Train recorded" in logs, logs[-3000:]
        assert "resumed from epoch" in logs
        (run,) = mlflow.search_runs([exp], filter_string="tags.ray_run_name = 'two-hosts'")
        assert run.info.status == "FINISHED" and "val/segm_AP" in run.data.metrics
        nodes = run.data.tags["ray.worker_nodes"].split(",")
        assert len(nodes) == 2 and len(set(nodes)) == 2
        steps = history("train/loss")
        # Every image once an epoch across the two workers, and every step logged once, none
        # twice after the recovery or the resume. (The split is dynamic, `equal=False`: a worker
        # may take more than half of an epoch, and both ranks then make as many steps as it.)
        assert run.data.metrics["train/images_skipped"] == 0
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 12, steps
        assert len(mlflow.get_metric_history(run.info.run_id, "train/epochs_completed")) == 6

        # Segmenting from the bucket into the bucket, one predictor on each host.
        infer = [*common, "infer.input=s3://data/shapes/val", "infer.output=s3://runs/rows",
                 "infer.model=models:/two-hosts@candidate", "infer.concurrency=2", "infer.cpus_per_actor=2",
                 "infer.batch_size=2", "infer.rows_per_file=2", "infer.overlays=0", "infer.torch_threads=1"]
        ok, logs = submit_and_wait(client, "mrcnn-infer", infer, aws)
        assert ok and "segmented 4 images" in logs, logs[-3000:]
        predictors = [x for x in list_actors(address=dashboard, detail=True, limit=1000)
                      if "Predictor" in (x.class_name or "")]
        assert len({x.node_id for x in predictors}) == 2, [(x.class_name, x.node_id) for x in predictors]
        paths = [p for f in list_files("s3://runs/rows", suffixes=(".parquet",))
                 for p in pq.read_table(io.BytesIO(read_bytes(f))).column("path").to_pylist()]
        assert sorted(paths) == sorted(f"s3://data/shapes/val/{p.name}" for p in (shapes / "val").glob("*.jpg"))
        # The same command again: every image is already in the bucket's rows, nothing is written.
        written = sorted(list_files("s3://runs/rows"))
        ok, logs = submit_and_wait(client, "mrcnn-infer", infer, aws)
        assert ok and "4 already in s3://runs/rows, 0 to segment" in logs, logs[-3000:]
        assert sorted(list_files("s3://runs/rows")) == written

        # Evaluating the registered model on the cluster: a predictor on each host, each a share
        # of the split; then promoting it (the first promotion: champion from candidate), one
        # pass of the same actors.
        predictors = ["infer.concurrency=2", "infer.cpus_per_actor=2", "infer.batch_size=1", "infer.torch_threads=1"]
        evaluate = [*common, "data.root=s3://data/shapes", *TINY, *predictors]
        ok, logs = submit_and_wait(client, "mrcnn-evaluate", [*evaluate, "+weights=models:/two-hosts@candidate"], aws)
        assert ok and "val: 4 images, model models:/two-hosts@candidate" in logs, logs[-3000:]
        (evaluated,) = mlflow.search_runs([exp], filter_string="tags.job = 'evaluate'")
        assert len(evaluated.data.tags["ray.predictor_nodes"].split(",")) == 2, evaluated.data.tags
        assert evaluated.data.metrics["val/segm_AP"] == pytest.approx(run.data.metrics["val/segm_AP"], abs=1e-9)
        ok, logs = submit_and_wait(client, "mrcnn-models", ["--tracking-uri", tracking, "promote", "two-hosts", "--",
                                                            *evaluate], aws)
        assert ok and "promoted version 1" in logs, logs[-3000:]
        assert mlflow.get_model_version_by_alias("two-hosts", "champion").version == "1"

        # A sweep of three trials, two at a time, one on each host (a trial's worker takes 2 of a
        # host's 3 CPUs): lr 2e-3 learns, 1e-9 and 1e-8 do not. Its driver is killed (SIGKILL) once
        # a trial has checkpointed and the third has started; the same command again resumes it
        # into the same parent run and trains no finished trial again. ASHA (a rung at epoch 1)
        # stops the third early: the first two set its rung (before the kill, or replayed after).
        tune = [*common, "data.root=s3://data/shapes", *TINY, "trainer.num_workers=1", "trainer.cpus_per_worker=2",
                "model.roi_heads.score_thresh=0.0", "sweep.name=hosts", "~sweep.space.model",
                "+sweep.space.trainer.optimizer.lr={grid:[2e-3,1e-9,1e-8]}", "sweep.num_samples=1",
                "sweep.metric=epoch_loss_classifier", "sweep.mode=min", "sweep.max_concurrent_trials=2",
                "sweep.scheduler.max_epochs=2", "sweep.scheduler.grace_period=1",
                "sweep.scheduler.reduction_factor=2", "tracking.registered_model=two-hosts-sweep"]
        trials_folder = "s3://runs/out/sweeps/hosts/trials"

        def checkpoints() -> dict[str, list[str]]:
            """{trial folder: its checkpoint files, oldest first}, listed in the bucket."""
            found: dict[str, list[str]] = {}
            for f in list_files(trials_folder):
                trial, _, rest = f[len(trials_folder) + 1:].partition("/")
                found.setdefault(trial, [])
                if rest.startswith("checkpoint_") and rest.endswith("/checkpoint.pt"):
                    found[trial].append(rest)
            return {t: sorted(cs) for t, cs in found.items()}

        job = submit(client, "mrcnn-tune", tune, job_env)
        deadline = time.time() + 400
        while True:
            assert time.time() < deadline and not client.get_job_status(job).is_terminal(), \
                client.get_job_logs(job)[-3000:]
            at_kill = checkpoints()
            if len(at_kill) >= 3 and any(at_kill.values()):
                break
            time.sleep(0.5)
        os.kill(int(client.get_job_info(job).driver_info.pid), signal.SIGKILL)  # its trials end with it
        assert wait(client, job)[0] == JobStatus.FAILED
        ok, logs = submit_and_wait(client, "mrcnn-tune", tune, job_env)
        assert ok and "resuming sweep hosts from s3://runs/out/sweeps/hosts" in logs, logs[-3000:]
        assert "registered two-hosts-sweep version 1 (alias candidate)" in logs, logs[-3000:]
        now = checkpoints()  # nothing trained before the kill was trained again
        assert all(now[t][:len(cs)] == cs for t, cs in at_kill.items()), (at_kill, now)
        assert any(cs and now[t] == cs for t, cs in at_kill.items()), (at_kill, now)

        (parent,) = mlflow.search_runs([exp], filter_string="tags.ray_run_name = 'hosts'")
        assert parent.data.tags["sweep"] == "hosts" and "train/epoch_loss_classifier" in parent.data.metrics
        assert {"trials.csv", "epoch_loss_classifier_vs_params.png", "config.yaml"} <= \
            {f.path for f in mlflow.list_artifacts(parent.info.run_id)}
        table = Path(mlflow.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
        rows = [{**r, "lr": float(r["trainer.optimizer.lr"]), "epochs": int(r["epochs"]),
                 "started": float(r["started"]), "ended": float(r["ended"])}
                for r in csv.DictReader(table.read_text().splitlines())]
        assert sorted(r["lr"] for r in rows) == [1e-9, 1e-8, 2e-3], rows
        assert "stopped early" in [r["status"] for r in rows], rows
        assert all(r["status"] == "completed" or (r["status"] == "stopped early" and r["epochs"] < 2) for r in rows)
        spans = sorted((r["started"], r["ended"]) for r in rows)  # two trials ran at once
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
        best = next(r for r in rows if f"best trial {r['trial_id']}:" in logs)
        assert best["lr"] == 2e-3
        trials = {t.data.tags["trial_id"]: t for t in mlflow.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
        assert len(trials) == 3 and len({t.data.tags["ray.worker_nodes"] for t in trials.values()}) == 2, \
            [t.data.tags for t in trials.values()]
        # Each trial's run ended when its trial did (its last report), not when the sweep did.
        for r in rows:
            assert abs(trials[r["trial_id"]].info.end_time / 1000 - r["ended"]) < 60, (r, trials[r["trial_id"]].info)
        for r in rows:
            trial = trials[r["trial_id"]]
            assert trial.info.status == "FINISHED"
            assert trial.data.tags["sweep.status"] == r["status"]
            logged = len(mlflow.get_metric_history(trial.info.run_id, "train/epoch_loss_classifier"))
            # A trial ASHA stops may finish the epoch it is in: at most one more than Tune recorded.
            assert logged == r["epochs"] if r["status"] == "completed" else r["epochs"] <= logged <= r["epochs"] + 1
            steps = [m.step for m in mlflow.get_metric_history(trial.info.run_id, "train/loss")]
            assert len(steps) == len(set(steps)), steps  # one loss value per step, resumed or not
            assert len(mlflow.search_logged_models([exp], filter_string=f"source_run_id = '{trial.info.run_id}'")) == 1

        # The registered candidate is the best trial's model, and predicts as its checkpoint does.
        assert mlflow.get_model_version_by_alias("two-hosts-sweep", "candidate").run_id == \
            trials[best["trial_id"]].info.run_id
        registered = load_model("models:/two-hosts-sweep@candidate", tracking).model.eval()
        checkpointed = load_model(f"{best['checkpoint']}/checkpoint.pt").model.eval()
        image = torch.from_numpy(decode_image((shapes / "val/000001.jpg").read_bytes())).permute(2, 0, 1) / 255
        with torch.no_grad():
            a_out, b_out = registered([image.float()])[0], checkpointed([image.float()])[0]
        assert len(a_out["scores"]) > 0
        for k in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(a_out[k], b_out[k])

        # Neither host's disk holds checkpoints, rows or tracking files.
        for host in (a, b):
            kept = " ".join(f"-path {shlex.quote(k)} -prune -o" for k in host.keep)  # the code, bound in
            found = host.run(f"find /tmp {kept} \\( -name checkpoint.pt -o -name '*.parquet' -o -name 'mlflow.db' "
                             "\\) -print", env)
            assert found.returncode == 0 and found.stdout.strip() == "", (host.name, found.stdout, found.stderr)

        # A local output folder (and the SQLite store in it), and weights to start from that only
        # host A has, on this cluster: refused before any work.
        assert a.run("mkdir /tmp/start && touch /tmp/start/checkpoint.pt", env).returncode == 0
        ok, logs = submit_and_wait(client, "mrcnn-train", ["output_dir=/tmp/local-out", "data.root=s3://data/shapes",
                                                            *TINY, "run_name=local",
                                                            "trainer.init_weights=/tmp/start/checkpoint.pt"], aws)
        assert not ok
        assert "output_dir=/tmp/local-out is a local path that node(s)" in logs, logs[-3000:]
        assert "tracking.tracking_uri=sqlite:////tmp/local-out/mlflow.db is a local path" in logs
        assert "trainer.init_weights=/tmp/start/checkpoint.pt is a local path that node(s)" in logs

        # Serving, left running by `ray job submit` as on any cluster: a replica on each host
        # behind host A's proxy, both answering. Host B is lost under load: only requests in flight
        # there fail (500; 2 of 348 here), every request is answered again within RECOVERY_S (1.9 s
        # here) by A's replica alone, and `ray job stop` ends the run FINISHED.
        serving = [*common, "serve.model=models:/two-hosts@champion", "serve.host=0.0.0.0", "serve.min_replicas=2",
                   "serve.max_replicas=2", "serve.max_replicas_per_node=1", "serve.torch_threads=1",
                   "serve.log_every_s=2"]
        job = submit(client, "mrcnn-serve", serving, aws)
        deadline = time.time() + 300
        while "serving models:/two-hosts@champion" not in client.get_job_logs(job):
            assert time.time() < deadline and not client.get_job_status(job).is_terminal(), \
                client.get_job_logs(job)[-3000:]
            time.sleep(1)
        replicas = [r for r in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")])
                    if r.class_name.endswith(":Segmenter")]
        assert len({r.node_id for r in replicas}) == 2, replicas
        answers = load_until(f"http://{a.address}:8000/segment", (shapes / "val/000001.jpg").read_bytes(),
                             b.stop, settle_s=10)
        lost_at = answers.event_time
        failed = [(done, status) for _, done, status, _ in answers.requests if status != 200]
        back = max((done for done, _ in failed), default=lost_at) - lost_at
        print(f"host B lost under load: {len(answers.requests)} requests, {len(failed)} failed "
              f"{sorted({s for _, s in failed})}, all answered again {back:.1f} s after")
        assert all(done >= lost_at for done, _ in failed) and back < RECOVERY_S, answers.requests
        assert answers.requests[-1][2] == 200
        before = {replica for _, done, _, replica in answers.requests if done < lost_at}
        after = {replica for sent, _, _, replica in answers.requests if sent > lost_at + back}
        assert len(before) == 2 and len(after) == 1 and after < before, (before, after)  # B's replica answered
        client.stop_job(job)
        assert wait(client, job, timeout=120)[0] == JobStatus.STOPPED
        (served,) = mlflow.search_runs([exp], filter_string="tags.job = 'serve'")
        assert served.info.status == "FINISHED" and served.data.tags["model_version"] == "1"


# How long after a host is lost requests may fail: until Serve's routers drop its replica.
RECOVERY_S = 30.0


@dataclass
class Load:
    requests: list[tuple[float, float, int, str]]  # (sent, answered, HTTP status or 0 for none, X-Replica), in order
    event_time: float


def load_until(url: str, body: bytes, event, settle_s: float, clients: int = 4) -> Load:
    """Requests from `clients` threads, back to back: `event()` after 3 s, then on until
    `settle_s` seconds without a failure after it (at most 120 s)."""
    import threading
    import urllib.error
    import urllib.request

    answers: list[tuple[float, float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent, replica = time.time(), ""
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as response:
                    status, replica = response.status, response.headers.get("X-Replica", "")
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = 0
            answers.append((sent, time.time(), status, replica))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    event_time = time.time()
    event()
    deadline = time.time() + 120
    while time.time() < deadline:
        last_failure = max((done for _, done, s, _ in answers if s != 200), default=event_time)
        if time.time() - last_failure > settle_s:
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return Load(sorted(answers), event_time)
