"""Evaluation on the cluster: the split's images predicted on predictor actors, COCOeval once on
the driver; the same metrics as predicting in the process, and the driver never runs a model."""

from __future__ import annotations

import pytest
import torch

from mrcnn import build_model
from mrcnn.checkpoint import save_checkpoint
from tests.helpers.coco import its_own_ground_truth
from tests.helpers.jobs import compose_job
from workflows.config import Paths, with_values
from workflows.inference.evaluation import predict_split, scored
from workflows.ingest import image_dataset, load_split
from workflows.registry import ResolvedModel
from workflows.training.steps import predict_to_coco

MODEL = ["model.transform.min_size=[64]", "model.transform.max_size=64", "model.num_classes=4",
         "model.roi_heads.score_thresh=0.0"]
LABELS = {"category_ids": [3, 7, 11], "names": ["circle", "square", "triangle"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gapped_shapes):
    """Two untrained models of different seeds as checkpoints (score threshold 0: many
    detections), and the job config of a copy of the gapped shapes set whose val ground truth is
    the first model's predictions (its AP is high, the second's low)."""
    folder = tmp_path_factory.mktemp("models")
    files, models = [], []
    cfg = compose_job(MODEL)
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model).eval())
        files.append(folder / f"model{seed}.pt")
        save_checkpoint(files[-1], models[-1], label_map=LABELS, step=0)
    judged = its_own_ground_truth(models[0], gapped_shapes, folder / "judged")
    cfg = compose_job([f"output_dir={folder}", f"data.root={judged}", "data.generate=null", *MODEL])
    return cfg, [ResolvedModel(str(f), str(f)) for f in files]


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal metrics, NaN (no object of that size) equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def in_process(cfg, model_file: str) -> dict[str, float]:
    from workflows.logged_model import load_model

    loaded = load_model(model_file)
    split = load_split(cfg.data, Paths.of(cfg).data_root, "val", categories=loaded.labels)
    batches = image_dataset(split, cfg.data, train=False).iter_batches(batch_size=4, batch_format="numpy")
    return predict_to_coco(loaded.model.eval(), batches, loaded.labels, torch.device("cpu")).evaluate(split.coco)


def test_the_cluster_gives_the_metrics_predicting_in_process_gives(ray_local, checkpoints):
    """One actor, two actors (each a share of the split), two models in one pass: each model's
    COCO metrics are exactly those of its predictions made in this process."""
    cfg, models = checkpoints
    split = load_split(cfg.data, Paths.of(cfg).data_root, "val")
    want = [in_process(cfg, m.uri) for m in models]
    assert want[0]["segm_AP50"] > 0.5 and want[1]["segm_AP50"] < want[0]["segm_AP50"], want
    for concurrency in (1, 2):
        infer = with_values(cfg, {"infer.concurrency": concurrency, "infer.batch_size": 4}).infer
        got = predict_split(split, models, infer, "sqlite:///unused.db", cfg.data.s3)
        assert not got.errors and len(got.nodes) == 1
        got = [r.evaluate(split.coco) for r in got.results]
        assert all(same(g, w) for g, w in zip(got, want)), (concurrency, got, want)


def test_evaluate_and_promote_request_the_predictor_resources(checkpoints, monkeypatch):
    """On a GPU cluster the evaluation's actors ask for `infer.num_gpus` each (what cannot run
    here is checked as requested): the dataset is built, not run."""
    import ray.data

    cfg, models = checkpoints
    asked = {}
    real = ray.data.Dataset.map_batches

    def recording(self, fn, *args, **kwargs):
        asked.update(kwargs, fn=fn)
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    gpu = with_values(cfg, {"infer.num_gpus": 1.0, "infer.concurrency": 4, "infer.cpus_per_actor": 2.0}).infer
    split = load_split(cfg.data, Paths.of(cfg).data_root, "val")
    scored(split, models, gpu, "sqlite:///unused.db", cfg.data.s3)
    assert asked["num_gpus"] == 1.0 and asked["num_cpus"] == 2.0 and asked["compute"].max_size == 4
    assert asked["fn"].__name__ == "Scorer" and asked["fn_constructor_kwargs"]["models"] == models


@pytest.mark.slow
def test_mrcnn_evaluate_never_runs_the_model_in_the_driver(ray_local, checkpoints, monkeypatch, tmp_path):
    """The evaluation job, run in this process with the model's constructor and forward refused
    here: the actors (other processes) predict, the driver only evaluates."""
    from mrcnn.modeling.mask_rcnn import MaskRCNN
    from workflows.jobs import evaluate

    cfg, models = checkpoints
    want = in_process(cfg, models[0].uri)

    def refused(*args, **kwargs):
        raise AssertionError("the driver built or ran a model")

    monkeypatch.setattr(MaskRCNN, "__init__", refused)
    monkeypatch.setattr(MaskRCNN, "forward", refused)
    job = with_values(cfg, {"output_dir": str(tmp_path), "infer.concurrency": 2})
    assert same(evaluate.run(job, models[0].uri), want)
