"""The training job: Hydra composition, Ray Train, MLflow, checkpoints, resume, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from helpers.jobs import compose_job, tiny
from helpers.servers import mlflow_server
from mlflow.tracking import MlflowClient

from workflows.config import validate
from workflows.registry import load_model
from workflows.train import run


def test_default_composition_and_groups():
    cfg = compose_job([])
    assert cfg["model"]["backbone"]["name"] == "resnet18" and cfg["data"]["name"] == "shapes"
    assert cfg["trainer"]["use_gpu"] is False and cfg["model"]["num_classes"] == 0
    coco = compose_job(["experiment=coco_r50_fpn_1x", "data.root=s3://bucket/coco"])
    assert coco["model"]["backbone"]["name"] == "resnet50" and coco["trainer"]["use_gpu"] is True
    assert coco["trainer"]["optimizer"]["milestones"] == [0.667, 0.889]
    assert coco["data"]["train_images"] == "train2017"


@pytest.mark.parametrize("override,message", [
    ("model.backbone.bogus=1", "bogus"),
    ("trainer.epochs=many", "epochs"),
])
def test_unknown_keys_and_wrong_types_fail_at_composition(override, message):
    with pytest.raises(Exception, match=message):
        compose_job([override])


@pytest.mark.parametrize("override,message", [
    ("model.backbone.name=vgg16", "model.backbone.name='vgg16'"),
    ("model.anchors.sizes=[[32],[64]]", "model.anchors.sizes has 2 levels"),
    ("trainer.batch_size=-2", "trainer.batch_size=-2 must be > 0"),
    ("model.rpn.nms_thresh=1.5", "model.rpn.nms_thresh=1.5"),
    ("data.missing_images=maybe", "data.missing_images='maybe'"),
])
def test_invalid_values_fail_before_ray(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_job([override]), "train")


def two_category_copy(src: Path, dst: Path) -> Path:
    """The dataset without its third category: 2 categories + background."""
    shutil.copytree(src, dst)
    for split in ("train", "val"):
        p = dst / f"annotations/instances_{split}.json"
        d = json.loads(p.read_text())
        d["categories"] = [c for c in d["categories"] if c["id"] != 11]
        d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 11]
        p.write_text(json.dumps(d))
    return dst


@pytest.mark.slow
def test_train_track_register_and_fine_tune(ray_local, gapped_shapes, tmp_path, monkeypatch):
    """In object storage (a local S3 server): checkpoints, the job's log and the rows of the data
    report land in the bucket, the tracking on an MLflow server; nothing in a local folder."""
    from helpers.s3server import CREDENTIALS, create_bucket, s3_server

    from workflows.storage import list_files

    with mlflow_server(tmp_path / "mlflow") as url, s3_server() as endpoint:
        create_bucket(endpoint, "runs")
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)  # this process; Ray's workers, started before, get the keys
        s3 = [f"data.s3.endpoint_override={endpoint}", "data.s3.access_key=testing", "data.s3.secret_key=testing"]
        monkeypatch.chdir(tmp_path)
        cfg = tiny("s3://runs/track", gapped_shapes, "trainer.epochs=1", f"tracking.tracking_uri={url}",
                   "run_name=tiny", "tracking.registered_model=shapes-tiny", *s3)
        first = run(cfg)
        assert first["checkpoint"].startswith("s3://runs/track/ray_results/tiny/checkpoint_")
        stored = list_files("s3://runs/track")
        assert first["checkpoint"] in stored and any(f.startswith("s3://runs/track/logs/train-") for f in stored)
        assert not [p for p in tmp_path.iterdir() if p.name not in ("mlflow", "mlartifacts")], list(tmp_path.iterdir())
        client = MlflowClient(url)
        r = client.get_run(first["run_id"])
        assert r.data.params["model.backbone.name"] == "resnet18"
        assert r.data.params["model.num_classes"] == "4"  # 3 categories + background
        assert r.data.tags["ray.worker_nodes"]
        kind = client.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"]
        assert kind == "custom_model_development"  # the UI's model-training view
        assert "val/segm_AP" in r.data.metrics and "val/bbox_AP50" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) >= 3  # 8 images / 2 per step
        for name in ("system/images_per_s", "system/data_wait_share", "train/lr", "train/loss_mask"):
            assert name in r.data.metrics
        files = {f.path for f in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "predictions", "data_report"} <= files
        assert r.data.metrics["train/images_skipped"] == 0 and r.data.tags["data.train_problems"] == "0"
        # The run's model: an MLflow logged model (pyfunc from code) with the final AP linked to it.
        logged = client.search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
        assert len(logged) == 1 and logged[0].name == "model"
        assert {m.key for m in logged[0].metrics} >= {"val/segm_AP", "val/bbox_AP"}
        mv = client.get_model_version_by_alias("shapes-tiny", "candidate")
        assert mv.run_id == first["run_id"] and mv.source == f"models:/{logged[0].model_id}"
        folder = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "dl"), tracking_uri=url))
        assert {"MLmodel", "mlflow_pyfunc.py"} <= {p.name for p in folder.iterdir()}
        assert {p.name for p in (folder / "artifacts").iterdir()} == {"weights.pt", "model_config.json",
                                                                     "label_map.json"}

        registered = load_model("models:/shapes-tiny@candidate", url)
        assert registered.labels.category_ids == [3, 7, 11] and registered.version == "1"
        assert load_model("models:/shapes-tiny/1", url).run_id == first["run_id"]
        with pytest.raises(ValueError, match="has versions v1 and aliases candidate"):
            load_model("models:/shapes-tiny@champion", url)
        with pytest.raises(ValueError, match="no registered model 'nope'"):
            load_model("models:/nope@champion", url)
        # Fine-tuning the registered model on a dataset with another class count: the run says
        # where it started; the class-dependent predictors start fresh (tests/test_job_parts.py).
        other = two_category_copy(gapped_shapes, tmp_path / "two")
        tuned = run(tiny("s3://runs/track", other, "trainer.epochs=1", f"tracking.tracking_uri={url}",
                         "run_name=tuned", "trainer.init_weights=models:/shapes-tiny@candidate", *s3))
        tags = client.get_run(tuned["run_id"]).data.tags
        assert tags["init_weights"] == "models:/shapes-tiny@candidate" and tags["init_model_version"] == "shapes-tiny/1"
        assert load_model(tuned["checkpoint"]).labels.category_ids == [3, 7]

        # (Rerunning a run name resumes it: test_interrupted_job_ends_killed_and_its_rerun_resumes...)
        loaded = load_model(first["checkpoint"])
        ckpt_model, ckpt_labels = loaded.model, loaded.labels
        assert ckpt_labels.category_ids == [3, 7, 11]
        import torch

        from mrcnn.evaluation.coco_eval import to_coco_results

        ckpt_model.eval()
        with torch.no_grad():
            pred = ckpt_model([torch.rand(3, 64, 64)])[0]
        assert len(pred["labels"]) > 0  # score_thresh 0: something is predicted
        bbox, _ = to_coco_results(1, pred, ckpt_labels)
        assert {b["category_id"] for b in bbox} <= {3, 7, 11}


def test_missing_image_stops_the_job_before_training(ray_local, gapped_shapes, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(gapped_shapes, root)
    (root / "val/000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="val/000002.jpg"):
        run(tiny(tmp_path / "out", root))
    assert not (tmp_path / "out" / "ray_results").exists()


@pytest.mark.slow
def test_recovers_from_a_killed_worker(ray_local, gapped_shapes, tmp_path):
    """Kill this job's training worker after its first checkpoint: Ray Train restarts it from
    there (a new worker process, the run tagged with the resume) and the job finishes into the
    same MLflow run with every step logged once."""
    import contextlib
    import signal
    import threading
    import time

    import psutil

    cfg = tiny(tmp_path / "out", gapped_shapes, "trainer.epochs=3", "trainer.max_failures=1", "run_name=kill")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run(cfg)))
    thread.start()
    snapshot = tmp_path / "out" / "ray_results" / "kill" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300  # until Ray Train has recorded a checkpoint to restart from
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()) and time.time() < deadline:
        time.sleep(0.3)

    victims = []  # this test's own Ray instance runs under this process: its workers are descendants
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("RayTrainWorker" in part for part in p.cmdline()):
                victims.append(p)
    assert len(victims) == 1, victims
    victims[0].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert result, "the job did not finish after the worker was killed"
    assert result["metrics"]["epoch"] == 2
    client = MlflowClient(result["tracking_uri"])
    exp = client.get_experiment_by_name("maskrcnn")
    found = client.search_runs([exp.experiment_id], filter_string="tags.ray_run_name = 'kill'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert found[0].data.tags["resumed_from"].startswith("epoch 0 step "), found[0].data.tags
    # The steps redone after the restart are in the history once; none is missing.
    steps = sorted(m.step for m in client.get_metric_history(result["run_id"], "train/loss"))
    assert steps == list(range(1, result["metrics"]["step"] + 1))


@pytest.mark.slow
def test_interrupted_job_ends_killed_and_its_rerun_resumes_into_the_same_run(gapped_shapes, tmp_path):
    """Ctrl-C (SIGINT) to `mrcnn-train` after its first checkpoint: it exits non-zero and its
    MLflow run ends KILLED. The same command resumes into the same run, which ends FINISHED with
    every step logged once, also when Ray Train has no record of the checkpoint (its record is
    removed here, as when a driver killed outright dies between a worker writing a checkpoint
    and Ray Train recording it). (tests/test_sweep.py and tests/test_infer.py SIGKILL theirs.)"""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray
    from helpers.servers import ray_temp_dir, remove_ray_temp_dir

    ray.shutdown()
    repo = Path(__file__).resolve().parents[1]
    db = tmp_path / "mlflow.db"
    args = [str(Path(sys.executable).parent / "mrcnn-train"), f"output_dir={tmp_path / 'out'}",
            f"data.root={gapped_shapes}", "data.generate=null", "model.transform.min_size=[64]",
            "model.transform.max_size=64",
            "trainer.batch_size=2", "trainer.epochs=4", "trainer.log_every_steps=1",
            f"tracking.tracking_uri=sqlite:///{db}", "run_name=stopped"]
    temp = ray_temp_dir("rk")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(RAY_TMPDIR=str(temp))
    snapshot = tmp_path / "out" / "ray_results" / "stopped" / "checkpoint_manager_snapshot.json"
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300  # until Ray Train has recorded a checkpoint
            while time.time() < deadline and proc.poll() is None and not (
                    snapshot.exists() and "checkpoint_" in snapshot.read_text()):
                time.sleep(0.3)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            remove_ray_temp_dir(temp)
    output = log_path.read_text()
    assert code != 0, output[-3000:]
    assert "MLflow run stopped (KILLED)" in output
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("maskrcnn").experiment_id
    found = client.search_runs([exp], filter_string="tags.ray_run_name = 'stopped'")
    assert len(found) == 1 and found[0].info.status == "KILLED", output[-3000:]
    checkpoints = sorted(snapshot.parent.glob("checkpoint_*/checkpoint.pt"))
    snapshot.unlink()

    try:
        again = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    finally:
        remove_ray_temp_dir(temp)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{checkpoints[-1]} is newer than any checkpoint Ray Train recorded" in again.stdout + again.stderr
    assert "resumed from epoch" in again.stdout + again.stderr
    found = client.search_runs([exp], filter_string="tags.ray_run_name = 'stopped'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss"))
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == 16
    assert len(client.get_metric_history(found[0].info.run_id, "train/epochs_completed")) == 4


@pytest.mark.slow
def test_a_crashed_job_ends_failed_with_the_error(ray_local, gapped_shapes, tmp_path):
    """A job whose training blows up ends its MLflow run FAILED with the error as a tag (an
    interrupted one ends KILLED: test_interrupted_job_ends_killed_and_its_rerun_resumes...)."""
    cfg = tiny(tmp_path / "out", gapped_shapes, "trainer.optimizer.lr=1e12", "run_name=diverges")
    with pytest.raises(Exception, match="loss is"):
        run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maskrcnn").experiment_id
    crashed = client.search_runs([exp], filter_string="tags.ray_run_name = 'diverges'")[0]
    assert crashed.info.status == "FAILED" and "loss is" in crashed.data.tags["error"], crashed.data.tags


def test_the_kuberay_manifest_runs_a_valid_command_on_the_pinned_ray():
    """deploy/rayjob.yaml's entrypoint composes with Hydra and passes every value check, and the
    image, the manifest and pyproject.toml name the same Ray."""
    import re
    import shlex

    import yaml

    repo = Path(__file__).resolve().parents[1]
    job = yaml.safe_load((repo / "deploy/rayjob.yaml").read_text())
    command, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert command == "mrcnn-train"
    cfg = compose_job(overrides)
    validate(cfg, "train")
    assert cfg["output_dir"].startswith("s3://") and cfg["data"]["root"].startswith("s3://")
    pinned = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<', (repo / "pyproject.toml").read_text()).group(1)
    version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert version.startswith(f"{pinned}.") and f"rayproject/ray:{version}-" in (repo / "deploy/Dockerfile").read_text()
