"""The training job: Hydra composition, Ray Train, MLflow, checkpoints, resume, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from servers import mlflow_server

from mrcnn.data.shapes import write_shapes_dataset
from workflows.config import CONF_DIR, register_configs, to_container
from workflows.train import prepare, run

register_configs()


def compose_job(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_container(compose(config_name="config", overrides=overrides))


def tiny(out: Path, root: Path, *extra: str) -> dict:
    return compose_job([
        f"output_dir={out}", f"data.root={root}", "data.generate=null",
        "model.transform.min_size=[64]", "model.transform.max_size=64",
        "model.roi_heads.score_thresh=0.0",
        "trainer.batch_size=2", "trainer.log_every_steps=1", "trainer.max_failures=0",
        "trainer.optimizer.warmup_steps=2", "tracking.log_images=2", *extra])


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
        prepare(compose_job([override]))


@pytest.fixture(scope="module")
def gapped_shapes(tmp_path_factory):
    """Shapes with category ids 3, 7, 11: predictions must come back with those ids."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("gapped"), train=8, val=4, size=64, seed=1)
    remap = {1: 3, 2: 7, 3: 11}
    for split in ("train", "val"):
        p = root / f"annotations/instances_{split}.json"
        d = json.loads(p.read_text())
        for c in d["categories"]:
            c["id"] = remap[c["id"]]
        for a in d["annotations"]:
            a["category_id"] = remap[a["category_id"]]
        p.write_text(json.dumps(d))
    return root


def test_train_track_resume_and_evaluate(ray_local, gapped_shapes, tmp_path):
    with mlflow_server(tmp_path / "mlflow") as url:
        cfg = tiny(tmp_path / "out", gapped_shapes, "trainer.epochs=1", f"tracking.tracking_uri={url}",
                   "run_name=tiny", "tracking.registered_model=shapes-tiny")
        first = run(cfg)
        client = MlflowClient(url)
        r = client.get_run(first["run_id"])
        assert r.data.params["model.backbone.name"] == "resnet18"
        assert r.data.params["model.num_classes"] == "4"  # 3 categories + background
        assert r.data.tags["ray.worker_nodes"]
        assert "segm_AP" in r.data.metrics and "bbox_AP50" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "loss")) >= 3  # 8 images / 2 per step
        for name in ("images_per_s", "lr", "data_wait_s", "loss_mask"):
            assert name in r.data.metrics
        files = {f.path for f in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "model", "predictions"} <= files
        model_files = {f.path for f in client.list_artifacts(r.info.run_id, "model")}
        assert model_files == {"model/weights.pt", "model/model_config.json", "model/label_map.json"}
        assert client.get_model_version_by_alias("shapes-tiny", "candidate").run_id == first["run_id"]

        # Same run name, more epochs: resumes from the checkpoint into the same MLflow run.
        second = run(tiny(tmp_path / "out", gapped_shapes, "trainer.epochs=2", f"tracking.tracking_uri={url}",
                          "run_name=tiny"))
        assert second["run_id"] == first["run_id"]
        assert second["metrics"]["epoch"] == 1 and second["metrics"]["step"] == 8
        steps = [m.step for m in client.get_metric_history(first["run_id"], "loss")]
        assert steps == sorted(steps) and steps[-1] == 8 and len(steps) == len(set(steps))

        from workflows.evaluate import load_model

        model, labels = load_model("models:/shapes-tiny@candidate", url)
        assert labels.category_ids == [3, 7, 11]
        ckpt_model, ckpt_labels = load_model(second["checkpoint"])
        assert ckpt_labels.category_ids == [3, 7, 11]
        from mrcnn.evaluation.coco_eval import to_coco_results
        import torch

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
