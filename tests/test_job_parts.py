"""The pieces the jobs are built from: LR schedule, sweep space, storage paths, metric keys, model
URIs, fine-tuning's starting point, DDP ranks stepping together."""

from __future__ import annotations

import os

import pytest

from workflows.config import flatten_space, get_path, set_path
from workflows.registry import ModelURI
from workflows.storage import join
from workflows.tracking import metric_key
from workflows.worker import lr_factor

OPT = {"warmup_steps": 10, "warmup_factor": 0.001, "milestones": [0.5, 0.75], "gamma": 0.1}


def test_lr_warms_up_linearly_then_steps_down_at_the_milestones():
    total = 100
    assert lr_factor(0, total, OPT) == pytest.approx(0.001)
    assert lr_factor(5, total, OPT) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, total, OPT) == 1.0
    assert lr_factor(49, total, OPT) == 1.0
    assert lr_factor(50, total, OPT) == pytest.approx(0.1)
    assert lr_factor(74, total, OPT) == pytest.approx(0.1)
    assert lr_factor(75, total, OPT) == pytest.approx(0.01)
    assert lr_factor(99, total, OPT) == pytest.approx(0.01)
    # Warmup past a milestone (at step 4 of 8): both apply.
    assert lr_factor(5, 8, OPT) == pytest.approx((0.001 * 0.5 + 0.5) * 0.1)


def test_sweep_space_nested_and_dotted_keys_flatten_alike():
    nested = {"model": {"backbone": {"name": {"grid": ["resnet18", "resnet50"]}}},
              "trainer.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}
    assert flatten_space(nested) == {"model.backbone.name": {"grid": ["resnet18", "resnet50"]},
                                     "trainer.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}
    assert flatten_space({}) == {}
    with pytest.raises(ValueError, match="sweep.space.model.x has .* exactly one of"):
        flatten_space({"model": {"x": {"grid": [1], "choice": [2]}}})
    with pytest.raises(ValueError, match="sweep.space.lr: expected"):
        flatten_space({"lr": 0.1})


def test_config_paths_get_and_set_a_copy():
    cfg = {"a": {"b": {"c": 1}}}
    value = [1, 2]
    set_path(cfg, "a.b.c", value)
    value.append(3)
    assert get_path(cfg, "a.b.c") == [1, 2]
    with pytest.raises(KeyError):
        get_path(cfg, "a.x")


def test_storage_join_keeps_uris_and_absolute_paths(tmp_path):
    assert join("s3://bucket/coco", "annotations/x.json") == "s3://bucket/coco/annotations/x.json"
    assert join("s3://bucket/coco", "") == "s3://bucket/coco"
    assert join("s3://bucket/coco", "s3://other/y.json") == "s3://other/y.json"
    assert join(str(tmp_path), "/abs/file.json") == "/abs/file.json"
    assert join(str(tmp_path), "rel/../a.json") == str(tmp_path / "a.json")
    assert join("relative/root", "a.json").startswith("/")


def test_metric_keys_fall_into_the_ui_sections():
    assert metric_key("segm_AP") == "val/segm_AP" and metric_key("bbox_AP50") == "val/bbox_AP50"
    assert metric_key("images_per_s") == "system/images_per_s"
    assert metric_key("loss_mask") == "train/loss_mask" and metric_key("lr") == "train/lr"
    assert metric_key("infer/images") == "infer/images"


@pytest.mark.parametrize("uri,fields", [
    ("models:/maskrcnn@champion", {"kind": "registry", "name": "maskrcnn", "alias": "champion"}),
    ("models:/maskrcnn/3", {"kind": "registry", "name": "maskrcnn", "version": "3"}),
    ("runs:/abc123/model", {"kind": "run", "run_id": "abc123", "path": "model"}),
    ("runs:/abc123", {"kind": "run", "run_id": "abc123", "path": "model"}),
    ("out/r/checkpoint_1/checkpoint.pt", {"kind": "file", "path": "out/r/checkpoint_1/checkpoint.pt"}),
    ("s3://b/r/checkpoint_1/checkpoint.pt", {"kind": "file", "path": "s3://b/r/checkpoint_1/checkpoint.pt"}),
])
def test_model_uris_parse(uri, fields):
    ref = ModelURI.parse(uri)
    for key, value in fields.items():
        assert getattr(ref, key) == value
    if ref.kind == "registry":
        assert ref.pinned("7") == "models:/maskrcnn/7"


@pytest.mark.parametrize("uri", ["models:/maskrcnn", "models:/maskrcnn/latest", "models:/@x", "runs:/",
                                 "models:maskrcnn", "http://host/model"])
def test_bad_model_uris_say_what_is_expected(uri):
    with pytest.raises(ValueError, match="expected"):
        ModelURI.parse(uri)


def test_fine_tuning_carries_over_everything_but_the_class_predictors(tmp_path, monkeypatch):
    """`trainer.init_weights` from a registered model (or a training checkpoint) trained on 3
    categories into a model for 2: backbone, FPN, RPN and the heads' shared layers carry over
    exactly; the class-dependent predictors keep their fresh initialisation. Logging the model
    leaves the process's MLflow settings (and the environment subprocesses inherit) as they were."""
    import mlflow
    import torch
    from helpers.jobs import compose_job

    from mrcnn import build_model
    from mrcnn.checkpoint import save_checkpoint
    from workflows.registry import log_model, register_model
    from workflows.tracking import mlflow_client, start_or_resume_run
    from workflows.worker import start_from

    small = ["model.transform.min_size=[64]", "model.transform.max_size=64"]
    parent = build_model(compose_job([*small, "model.num_classes=4"])["model"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_or_resume_run(uri, "maskrcnn", "parent", {})
    labels = {"category_ids": [3, 7, 11], "names": ["circle", "square", "triangle"]}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://the-users-server:5000")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    log_model(uri, run_id, {"model": parent.state_dict(), "model_config": parent.cfg.to_dict(), "label_map": labels})
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before == ("http://the-users-server:5000",) * 2
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://the-users-server:5000"
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    register_model(mlflow_client(uri), run_id, "parent")
    save_checkpoint(tmp_path / "checkpoint.pt", parent, label_map=labels)
    want = parent.state_dict()
    predictors = {f"roi_heads.{m}.{p}" for m in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                  "mask_predictor.mask_fcn_logits") for p in ("weight", "bias")}
    for source in ("models:/parent@candidate", str(tmp_path / "checkpoint.pt")):
        torch.manual_seed(1)
        child = build_model(compose_job([*small, "model.num_classes=3"])["model"])
        before = {k: v.clone() for k, v in child.state_dict().items()}
        start_from(child, source, uri, say_it=False)
        got = child.state_dict()
        assert {k for k in got if got[k].shape != want[k].shape} == predictors
        for k, v in got.items():
            assert torch.equal(v, before[k] if k in predictors else want[k]), (source, k)


def test_ddp_ranks_step_together_however_unevenly_an_epoch_is_dealt(tmp_path):
    """A dynamic split may give one rank all of an epoch (here rank 1 nothing, then a share
    twice rank 0's). The ranks still make the same steps: same parameters and optimizer state,
    the LR schedule read at the images trained on by all ranks, no image counted twice."""
    import socket

    import torch
    import torch.multiprocessing as mp
    from helpers.ddp import uneven_rank

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shares = [[3, 0], [1, 2]]  # batches of 2 images: (rank 0, rank 1) per epoch
    mp.spawn(uneven_rank, args=(2, port, shares, str(tmp_path / "rank")), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank.{r}.pt") for r in (0, 1))
    assert [e["step"] for e in a["epochs"]] == [e["step"] for e in b["epochs"]] == [3, 5]
    assert [e["images"] for e in a["epochs"]] == [6, 2] and [e["images"] for e in b["epochs"]] == [0, 4]
    assert [e["progress"] for e in a["epochs"]] == [e["progress"] for e in b["epochs"]] == [6, 12]
    assert a["epochs"][-1]["loss"] == b["epochs"][-1]["loss"]  # averaged over the ranks' batches
    # 12 images in steps of 4 planned: 3 planned steps, the schedule's drop, in 5 steps made.
    assert a["lr"] == b["lr"] == pytest.approx(1e-5)
    assert torch.equal(a["params"], b["params"]) and torch.equal(a["momentum"], b["momentum"])


def test_model_files_given_as_local_paths_are_checked_on_every_node(tmp_path):
    """On a cluster, a fine-tuning start or an infer model given as a local file is read by
    workers on every node: its folder is among the paths the node check compares; registered
    models and object-store URIs are not."""
    from helpers.jobs import compose_job

    from workflows.node_paths import local_paths

    weights = tmp_path / "w" / "checkpoint.pt"
    train = compose_job([f"output_dir={tmp_path}", f"trainer.init_weights={weights}"])
    assert local_paths(train, "train", "http://server:5000")["trainer.init_weights"] == \
        (str(weights), str(weights.parent), False)
    for uri in ("models:/shapes@champion", "s3://bucket/run/checkpoint.pt", "runs:/abc/model"):
        cfg = compose_job([f"output_dir={tmp_path}", f"trainer.init_weights={uri}", f"infer.model={uri}"])
        assert not {"trainer.init_weights", "infer.model"} & set(local_paths(cfg, "train", None)), uri
        assert "infer.model" not in local_paths(cfg, "infer", None), uri
    infer = compose_job([f"output_dir={tmp_path}", f"infer.model={weights}"])
    assert local_paths(infer, "infer", None)["infer.model"][1] == str(weights.parent)
