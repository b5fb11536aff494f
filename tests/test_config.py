"""The typed job config: composed once, read by attribute, never written by a job; sweep spaces
and per-trial values; the paths a cluster's nodes must share."""

from __future__ import annotations

import copy

import pytest

from workflows.checks import flatten_space
from workflows.config import JobConfig, Paths, compose_config, value_at, with_values


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


def test_the_composed_config_is_typed_objects():
    cfg = compose_config(["model=r50_fpn", "trainer.epochs=3"])
    assert isinstance(cfg, JobConfig) and type(cfg.model).__name__ == "ModelConfig"
    assert cfg.model.backbone.name == "resnet50" and cfg.trainer.epochs == 3
    assert cfg.data.generate is not None and cfg.data.generate.train == 256  # shapes: the schema's sizes
    with pytest.raises(AttributeError):
        cfg.trainer.epochz  # noqa: B018 - a misspelt key fails where it is read


def test_trial_values_make_a_new_typed_config_and_leave_the_base_alone():
    base = compose_config([])
    before = copy.deepcopy(base)
    trial = with_values(base, {"model.backbone.name": "resnet34", "trainer.optimizer.lr": 0.5,
                               "model.anchors.sizes": [[16], [32], [64], [128], [256]]})
    assert trial.model.backbone.name == "resnet34" and trial.trainer.optimizer.lr == 0.5
    assert value_at(trial, "model.anchors.sizes")[0] == [16]
    assert base == before
    with pytest.raises(Exception, match="nope"):
        with_values(base, {"model.nope": 1})
    with pytest.raises(Exception, match="epochs"):
        with_values(base, {"trainer.epochs": "many"})
    with pytest.raises(AttributeError):
        value_at(base, "model.backbone.depth")


def test_paths_are_derived_absolute_and_uris_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["output_dir=out", "data.root=s3://bucket/coco", "infer.input=images"])
    paths = Paths.of(cfg)
    assert paths.output_dir == str(tmp_path / "out") and paths.data_root == "s3://bucket/coco"
    assert paths.infer_input == str(tmp_path / "images") and paths.infer_output is None
    assert cfg.output_dir == "out" and cfg.infer.input == "images"  # the config as composed


def test_model_files_given_as_local_paths_are_checked_on_every_node(tmp_path):
    """On a cluster, a fine-tuning start or an infer model given as a local file is read by
    workers on every node: its folder is among the paths the node check compares; registered
    models and object-store URIs are not."""
    from tests.helpers.jobs import compose_job
    from workflows.config import Paths
    from workflows.runtime.node_paths import local_paths

    def paths_of(cfg, kind, uri):
        return local_paths(cfg, Paths.of(cfg), kind, uri)

    weights = tmp_path / "w" / "checkpoint.pt"
    train = compose_job([f"output_dir={tmp_path}", f"trainer.init_weights={weights}"])
    assert paths_of(train, "train", "http://server:5000")["trainer.init_weights"] == \
        (str(weights), str(weights.parent), False)
    for uri in ("models:/shapes@champion", "s3://bucket/run/checkpoint.pt", "runs:/abc/model"):
        cfg = compose_job([f"output_dir={tmp_path}", f"trainer.init_weights={uri}", f"infer.model={uri}"])
        assert not {"trainer.init_weights", "infer.model"} & set(paths_of(cfg, "train", None)), uri
        assert "infer.model" not in paths_of(cfg, "infer", None), uri
    infer = compose_job([f"output_dir={tmp_path}", f"infer.model={weights}"])
    assert paths_of(infer, "infer", None)["infer.model"][1] == str(weights.parent)


@pytest.mark.parametrize("overrides,message", [
    (["trainer.precision=fp16"], "trainer.precision=fp16 needs CUDA GPUs"),
    (["trainer.precision=int8"], "trainer.precision='int8' must be fp32, bf16 or fp16"),
    (["+trainer.amp=true"], "trainer.amp is replaced by trainer.precision: write trainer.precision=fp16"),
])
def test_a_precision_the_devices_cannot_run_stops_the_job_before_work(overrides, message):
    from workflows.checks import validate

    with pytest.raises(ValueError, match=message):
        validate(compose_config(overrides), "train")


def test_fp16_predictors_need_gpus_and_bf16_runs_where_the_cpu_has_it():
    from mrcnn.precision import cpu_has_bf16
    from workflows.checks import validate

    with pytest.raises(ValueError, match="infer.precision=fp16 needs CUDA GPUs"):
        validate(compose_config(["infer.precision=fp16"]), "evaluate")
    validate(compose_config(["infer.precision=fp16", "infer.num_gpus=1"]), "evaluate")  # a GPU cluster's
    bf16 = compose_config(["infer.precision=bf16"])
    if cpu_has_bf16():
        validate(bf16, "evaluate")
    else:
        with pytest.raises(ValueError, match="no bf16 instructions"):
            validate(bf16, "evaluate")
