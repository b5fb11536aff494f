"""The training package's pieces: the LR schedule, fine-tuning's starting point, DDP ranks
stepping together."""

from __future__ import annotations

import os

import pytest

from workflows.config import OptimizerConfig
from workflows.training.loop import lr_factor

OPT = OptimizerConfig(warmup_steps=10, warmup_factor=0.001, milestones=[0.5, 0.75], gamma=0.1)


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


def test_fine_tuning_carries_over_everything_but_the_class_predictors(tmp_path, monkeypatch):
    """`trainer.init_weights` from a registered model (or a training checkpoint) trained on 3
    categories into a model for 2: backbone, FPN, RPN and the heads' shared layers carry over
    exactly; the class-dependent predictors keep their fresh initialisation. Logging the model
    leaves the process's MLflow settings (and the environment subprocesses inherit) as they were."""
    import mlflow
    import torch

    from mrcnn import build_model
    from mrcnn.checkpoint import save_checkpoint
    from tests.helpers.jobs import compose_job
    from workflows.logged_model import log_model
    from workflows.registry import register_model
    from workflows.tracking import mlflow_client, start_or_resume_run
    from workflows.training.loop import start_from

    small = ["model.transform.min_size=[64]", "model.transform.max_size=64"]
    parent = build_model(compose_job([*small, "model.num_classes=4"]).model)
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
        child = build_model(compose_job([*small, "model.num_classes=3"]).model)
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

    from tests.helpers.ddp import uneven_rank

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
