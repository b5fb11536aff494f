"""The training job: Hydra composition, Ray Train, MLflow, checkpoints, resume, evaluation."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.jobs import compose_job, tiny
from tests.helpers.servers import mlflow_server
from workflows.checks import validate
from workflows.jobs.train import run
from workflows.logged_model import load_model


def test_default_composition_and_groups():
    cfg = compose_job([])
    assert cfg.model.backbone.name == "resnet18" and cfg.data.name == "shapes"
    assert cfg.trainer.use_gpu is False and cfg.model.num_classes == 0
    coco = compose_job(["experiment=coco_r50_fpn_1x", "data.root=s3://bucket/coco"])
    assert coco.model.backbone.name == "resnet50" and coco.trainer.use_gpu is True
    assert coco.trainer.optimizer.milestones == [0.667, 0.889]
    assert coco.data.train_images == "train2017"


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
    from tests.helpers.s3server import CREDENTIALS, create_bucket, s3_server
    from workflows.storage import list_files

    with mlflow_server(tmp_path / "mlflow") as url, s3_server() as endpoint:
        create_bucket(endpoint, "runs")
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)  # this process; Ray's workers, started before, get the keys
        s3 = [f"data.s3.endpoint_override={endpoint}", "data.s3.access_key=testing", "data.s3.secret_key=testing"]
        monkeypatch.chdir(tmp_path)
        cfg = tiny("s3://runs/track", gapped_shapes, "trainer.epochs=1", f"tracking.tracking_uri={url}",
                   "run_name=tiny", "tracking.registered_model=shapes-tiny", *s3)
        composed = copy.deepcopy(cfg)
        first = run(cfg)
        assert cfg == composed  # what the job derived was passed on, not written into the config
        assert first["checkpoint"].startswith("s3://runs/track/ray_results/tiny/checkpoint_")
        stored = list_files("s3://runs/track")
        assert first["checkpoint"] in stored and any(f.startswith("s3://runs/track/logs/train-") for f in stored)
        assert not [p for p in tmp_path.iterdir() if p.name not in ("mlflow", "mlartifacts")], list(tmp_path.iterdir())
        client = MlflowClient(url)
        r = client.get_run(first["run_id"])
        assert r.data.params["model.backbone.name"] == "resnet18"
        # As composed (0: follow the data), and as derived: 3 categories + background
        assert r.data.params["model.num_classes"] == "0" and r.data.params["derived.model.num_classes"] == "4"
        assert r.data.tags["ray.worker_nodes"]
        kind = client.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"]
        assert kind == "custom_model_development"  # the UI's model-training view
        assert "val/segm_AP" in r.data.metrics and "val/bbox_AP50" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) >= 3  # 8 images / 2 per step
        for name in ("system/images_per_s", "system/data_wait_share", "train/lr", "train/loss_mask"):
            assert name in r.data.metrics
        files = {f.path for f in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "derived.yaml", "predictions", "data_report"} <= files
        assert r.data.metrics["train/images_skipped"] == 0 and r.data.tags["data.train_problems"] == "0"
        # The run's model: an MLflow logged model (pyfunc from code) with the final AP linked to it.
        logged = client.search_logged_models([r.info.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
        assert len(logged) == 1 and logged[0].name == "model"
        assert {m.key for m in logged[0].metrics} >= {"val/segm_AP", "val/bbox_AP"}
        mv = client.get_model_version_by_alias("shapes-tiny", "candidate")
        assert mv.run_id == first["run_id"] and mv.source == f"models:/{logged[0].model_id}"
        location = client.get_logged_model(logged[0].model_id).artifact_location
        folder = Path(mlflow.artifacts.download_artifacts(location, dst_path=str(tmp_path / "dl"), tracking_uri=url))
        assert {"MLmodel", "mlflow_pyfunc.py"} <= {p.name for p in folder.iterdir()}
        assert {p.name for p in (folder / "artifacts").iterdir()} == {"weights.pt", "model_config.json",
                                                                     "label_map.json"}

        # The training run's own evaluation of its last epoch is what `mrcnn-evaluate` finds for
        # the model it registered (the same images, on predictor actors instead of the workers).
        from workflows.jobs import evaluate

        evaluated = evaluate.run(cfg, "models:/shapes-tiny@candidate")
        for key in ("segm_AP", "bbox_AP", "segm_AP50"):
            assert evaluated[key] == pytest.approx(r.data.metrics[f"val/{key}"], abs=1e-9), key

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

        # (Rerunning a run name resumes it: tests/test_two_hosts.py)
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
    assert cfg.output_dir.startswith("s3://") and cfg.data.root.startswith("s3://")
    pinned = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<', (repo / "pyproject.toml").read_text()).group(1)
    version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert version.startswith(f"{pinned}.") and f"rayproject/ray:{version}-" in (repo / "deploy/Dockerfile").read_text()
