"""Sweeps (`mrcnn-tune`) and the registry (`mrcnn-models`) against a real local Ray cluster and a
real MLflow server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.jobs import compose_job
from helpers.servers import mlflow_server, ray_head
from mlflow.tracking import MlflowClient

from mrcnn.checkpoint import load_weights_file
from workflows import promote, sweep
from workflows.cli import models as models_cli
from workflows.registry import load_model, log_model
from workflows.tracking import start_or_resume_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.generate=null", "model.transform.min_size=[64]", "model.transform.max_size=64",
        "model.roi_heads.score_thresh=0.0", "trainer.batch_size=2", "trainer.log_every_steps=1",
        "trainer.max_failures=0", "trainer.optimizer.warmup_steps=2", "tracking.log_images=1"]


@pytest.mark.parametrize("override,message", [
    ("+sweep.space.model.backbone.depth={choice:[1,2]}", "'model.backbone.depth' is not a key"),
    ("sweep.space.model.backbone.name.grid=[resnet18,vgg16]", "value 'vgg16'"),
    ("+sweep.space.trainer.optimizer.lr={loguniform:[0.1,0.01]}", "low < high"),
])
def test_bad_sweep_space_fails_before_ray(override, message, gapped_shapes, tmp_path):
    import ray

    ray.shutdown()
    cfg = compose_job([f"output_dir={tmp_path}", f"data.root={gapped_shapes}", *TINY, override])
    with pytest.raises(ValueError, match=message):
        sweep.run(cfg)
    assert not ray.is_initialized()


def reports_per_epoch(config):
    """A trial that reports `loss` for two epochs and checkpoints each (as ours do)."""
    import json
    import tempfile

    from ray import tune

    start = 0
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as d:
            start = json.loads((Path(d) / "epoch.json").read_text())
    for epoch in range(start + 1, 3):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "epoch.json").write_text(json.dumps(epoch))
            tune.report({sweep.TIME_ATTR: epoch, "loss": config["loss"]}, checkpoint=tune.Checkpoint(d))


def test_a_resumed_sweep_keeps_the_rungs_its_earlier_trials_set(ray_local, tmp_path):
    """One trial at a time: loss 1 (good), then loss 5. The driver is interrupted once the first
    trial has finished, and the sweep restored: the second trial reaches the rung (epoch 1 of 2)
    first in the new driver. The earlier trial's reports replayed, ASHA stops it there (Tune's
    own ASHA, whose rungs start empty again after a restore, runs it to the end)."""
    import signal

    from ray import tune
    from ray.tune import Callback

    class InterruptAfterTheFirstTrial(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial.config["loss"] == 1.0:
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends the run, its state saved

    scheduler = sweep.ResumableASHA(time_attr=sweep.TIME_ATTR, max_t=2, grace_period=1, reduction_factor=2)
    first = tune.Tuner(
        reports_per_epoch, param_space={"loss": tune.grid_search([1.0, 5.0])},
        tune_config=tune.TuneConfig(metric="loss", mode="min", max_concurrent_trials=1, scheduler=scheduler),
        run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path), callbacks=[InterruptAfterTheFirstTrial()],
                                  verbose=0)).fit()
    assert [r.config["loss"] for r in first] == [1.0]  # the second trial had not started
    resumed = tune.Tuner.restore(str(tmp_path / "asha"), trainable=reports_per_epoch, resume_unfinished=True).fit()
    assert {r.config["loss"]: r.metrics[sweep.TIME_ATTR] for r in resumed} == {1.0: 2, 5.0: 1}


@pytest.mark.slow
def test_a_sweep_in_a_bucket_survives_its_driver_stops_bad_trials_registers_the_best_and_promotes(
        gapped_shapes, tmp_path, monkeypatch):
    """Three trials, two at a time on a Ray head: lr 2e-3 learns, 1e-9 and 1e-8 do not. The sweep's
    state and the trials' checkpoints live in a bucket (a local S3 server) reached through the AWS
    environment alone, the tracking on an MLflow server. The driver is SIGKILLed once a trial has
    checkpointed and a third has started; the same sweep, run again, resumes into the same parent
    run and trains no finished trial again. ASHA (a rung at epoch 1) stops the third early: the
    first two have set its rung by then (before the kill, or replayed after it). The best trial
    becomes `candidate`, equal to its checkpoint; `promote` judges it."""
    import ray
    from helpers.s3server import CREDENTIALS, create_bucket, s3_server

    from workflows.storage import join, list_files, local_file

    ray.shutdown()
    trials = "s3://runs/out/sweeps/lr/trials"

    def checkpoints() -> dict[str, list[str]]:
        """{trial folder: its checkpoint files, oldest first}, listed in the bucket."""
        found: dict[str, list[str]] = {}
        for f in list_files(trials):
            trial, _, rest = f[len(trials) + 1:].partition("/")
            found.setdefault(trial, [])
            if rest.startswith("checkpoint_") and rest.endswith("/checkpoint.pt"):
                found[trial].append(rest)
        return {t: sorted(cs) for t, cs in found.items()}

    with mlflow_server(tmp_path / "mlflow") as url, s3_server() as endpoint, contextlib.ExitStack() as stack:
        create_bucket(endpoint, "runs")
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)  # the head's processes, started next, have them too
        head = stack.enter_context(ray_head(num_cpus=4))
        overrides = [
            "output_dir=s3://runs/out", f"data.root={gapped_shapes}", *TINY, f"tracking.tracking_uri={url}",
            f"ray_address={head.address}", "tracking.registered_model=shapes-sweep", "sweep.name=lr",
            "~sweep.space.model", "+sweep.space.trainer.optimizer.lr={grid:[2e-3,1e-9,1e-8]}", "sweep.num_samples=1",
            "sweep.metric=epoch_loss_classifier", "sweep.mode=min", "sweep.max_concurrent_trials=2",
            "sweep.scheduler.max_epochs=2", "sweep.scheduler.grace_period=1", "sweep.scheduler.reduction_factor=2"]
        # The jobs run as commands on the head (whose token authentication is off); this process
        # keeps its own Ray settings for the local instances of the tests after it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["RAY_AUTH_MODE"] = "disabled"
        command = [str(Path(sys.executable).parent / "mrcnn-tune"), *overrides]
        log = tmp_path / "first.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, cwd=tmp_path,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.time() + 400
                while time.time() < deadline and proc.poll() is None:
                    at_kill = checkpoints()
                    if len(at_kill) >= 3 and any(at_kill.values()):
                        break
                    time.sleep(0.5)
                assert proc.poll() is None, log.read_text()[-3000:]
                assert len(at_kill) >= 3, "the sweep did not reach its third trial in time"
            finally:
                os.killpg(proc.pid, 9)  # the driver: its trials end with it; the head stays
                proc.wait()

        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "resuming sweep lr from s3://runs/out/sweeps/lr" in again.stdout
        assert "registered shapes-sweep version None" not in again.stdout, again.stdout[-4000:]
        # Nothing trained before the kill was trained again: each trial's checkpoints then are
        # the first of its checkpoints now, and at least one trial had all of its own.
        now = checkpoints()
        assert all(now[t][:len(cs)] == cs for t, cs in at_kill.items()), (at_kill, now)
        assert any(cs and now[t] == cs for t, cs in at_kill.items()), (at_kill, now)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("s3")]

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("maskrcnn").experiment_id
        (parent,) = client.search_runs([exp], filter_string="tags.ray_run_name = 'lr'")
        assert parent.data.tags["sweep"] == "lr" and "train/epoch_loss_classifier" in parent.data.metrics
        artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
        assert {"trials.csv", "epoch_loss_classifier_vs_params.png", "config.yaml"} <= artifacts
        table = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
        rows = [{**r, "trainer.optimizer.lr": float(r["trainer.optimizer.lr"]), "epochs": int(r["epochs"]),
                 "started": float(r["started"]), "ended": float(r["ended"])}
                for r in csv.DictReader(table.read_text().splitlines())]
        assert sorted(r["trainer.optimizer.lr"] for r in rows) == [1e-9, 1e-8, 2e-3], rows
        statuses = [r["status"] for r in rows]
        assert "stopped early" in statuses, rows
        assert all(r["epochs"] < 2 for r in rows if r["status"] == "stopped early")
        assert all(s in ("completed", "stopped early") for s in statuses)
        best = next(r for r in rows if f"best trial {r['trial_id']}:" in again.stdout)
        assert best["trainer.optimizer.lr"] == 2e-3
        children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 3
        by_trial = {c.data.tags["trial_id"]: c for c in children}
        for r in rows:
            child = by_trial[r["trial_id"]]
            assert child.data.tags["sweep.status"] == r["status"]
            assert child.data.params["trainer.optimizer.lr"] == str(r["trainer.optimizer.lr"])
            logged = len(client.get_metric_history(child.info.run_id, "train/epoch_loss_classifier"))
            # A trial ASHA stops may finish the epoch it is in before it is killed: at most one
            # epoch more in MLflow than Tune recorded.
            assert logged == r["epochs"] if r["status"] == "completed" else r["epochs"] <= logged <= r["epochs"] + 1
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
            assert len(steps) == len(set(steps)), steps  # one loss value per step, resumed or not
            # Each trial's model, read from its checkpoint in the bucket.
            assert len(client.search_logged_models([exp], filter_string=f"source_run_id = '{child.info.run_id}'")) == 1

        # Two trials ran at once: their report times overlap.
        spans = sorted((r["started"], r["ended"]) for r in rows)
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans

        # The registered candidate is the best trial's model, and predicts as its checkpoint does.
        mv = client.get_model_version_by_alias("shapes-sweep", "candidate")
        assert mv.run_id == by_trial[best["trial_id"]].info.run_id
        best_checkpoint = join(best["checkpoint"], "checkpoint.pt")
        registered = load_model("models:/shapes-sweep@candidate", url).model.eval()
        checkpointed = load_model(best_checkpoint).model.eval()
        from mrcnn.data.images import decode_image

        image = torch.from_numpy(decode_image((gapped_shapes / "val/000001.jpg").read_bytes())).permute(2, 0, 1)
        with torch.no_grad():
            a, b = registered([image.float() / 255])[0], checkpointed([image.float() / 255])[0]
        assert len(a["scores"]) > 0
        for k in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(a[k], b[k])

        # promote, on a val split whose ground truth is what the best trial predicts (so its AP
        # is high whatever a few tiny epochs taught it). A blind model (its classifier always
        # says background: no detection, AP 0) is champion; the best trial beats it; a blind
        # candidate does not replace that.
        judged = its_own_ground_truth(registered, gapped_shapes, tmp_path / "judged")
        eval_overrides = [f"output_dir={tmp_path / 'out'}", f"data.root={judged}", *TINY]
        with local_file(best_checkpoint) as path:
            payload = load_weights_file(path)
        bias = payload["model"]["roi_heads.box_predictor.cls_score.bias"]
        bias[:] = -100.0
        bias[0] = 100.0
        blind_run = start_or_resume_run(url, "maskrcnn", "blind", {"model": payload["model_config"]})
        log_model(url, blind_run, payload)
        blind = registry_version(client, url, blind_run, eval_overrides)
        models_cli(["--tracking-uri", url, "alias", "shapes-sweep", blind, "champion", "--", *eval_overrides])
        models_cli(["--tracking-uri", url, "alias", "shapes-sweep", str(mv.version), "candidate", "--",
                       *eval_overrides])
        judge = compose_job([*eval_overrides, f"tracking.tracking_uri={url}"])
        better = promote.run(judge, "shapes-sweep", metric="segm_AP50")
        assert better["champion_segm_AP50"] == 0 and better["candidate_segm_AP50"] > 0, better
        assert better["decision"] == f"promoted version {mv.version}"
        assert client.get_model_version_by_alias("shapes-sweep", "champion").version == mv.version

        worse_version = registry_version(client, url, blind_run, eval_overrides)  # alias candidate
        worse = promote.run(compose_job([*eval_overrides, f"tracking.tracking_uri={url}"]), "shapes-sweep",
                            metric="segm_AP50")
        assert worse["decision"].startswith(f"kept version {mv.version}") and worse["candidate"] == worse_version
        assert client.get_model_version_by_alias("shapes-sweep", "champion").version == mv.version
        promo = client.get_run(worse["run_id"])
        assert promo.data.metrics["candidate/segm_AP50"] == 0 and promo.data.metrics["champion/segm_AP50"] > 0
        assert promo.data.tags["decision"] == worse["decision"]


def its_own_ground_truth(model, src: Path, dst: Path) -> Path:
    """A copy of the shapes dataset whose val annotations are `model`'s predictions."""
    import json
    import shutil

    from mrcnn.data.images import decode_image
    from mrcnn.masks import encode_masks

    shutil.copytree(src, dst)
    ann_path = dst / "annotations/instances_val.json"
    coco = json.loads(ann_path.read_text())
    categories = sorted(c["id"] for c in coco["categories"])
    anns = []
    for im in coco["images"]:
        pixels = decode_image((dst / im["file_name"]).read_bytes())
        with torch.no_grad():
            p = model([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
        for box, label, rle in zip(p["boxes"].tolist(), p["labels"].tolist(), encode_masks(p["masks"])):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": categories[label - 1],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle, "iscrowd": 0,
                         "area": (x2 - x1) * (y2 - y1)})
    assert anns, "the model predicts nothing: no ground truth to judge by"
    ann_path.write_text(json.dumps({**coco, "annotations": anns}))
    return dst


def registry_version(client, url: str, run_id: str, overrides: list[str]) -> str:
    """`mrcnn-models register RUN_ID shapes-sweep`; returns the new version."""
    models_cli(["--tracking-uri", url, "register", run_id, "shapes-sweep", "--", *overrides])
    return str(client.get_model_version_by_alias("shapes-sweep", "candidate").version)
