"""Sweeps (`mrcnn-tune`) and promotion (`mrcnn-models promote`) on a local Ray instance and a SQLite
registry. A whole sweep killed and resumed, in a bucket, on two hosts: tests/test_two_hosts.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mrcnn import build_model
from tests.helpers.coco import its_own_ground_truth
from tests.helpers.jobs import compose_job
from workflows.cli import models as models_cli
from workflows.config import as_dict
from workflows.jobs import models as promote
from workflows.jobs import tune as sweep
from workflows.logged_model import log_model
from workflows.tracking import start_or_resume_run

TINY = ["data.generate=null", "model.transform.min_size=[64]", "model.transform.max_size=64",
        "model.roi_heads.score_thresh=0.0", "trainer.batch_size=2", "trainer.log_every_steps=1",
        "trainer.max_failures=0", "trainer.optimizer.warmup_steps=2", "tracking.log_images=1"]
MODEL = ["model.transform.min_size=[64]", "model.transform.max_size=64", "model.num_classes=4",
         "model.roi_heads.score_thresh=0.0"]


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


def quadratic(config):
    """A trial that reports once, after a second: the distance of `x` from 0.3, squared."""
    import time

    from ray import tune

    time.sleep(1)  # the interrupt lands before the next trial ends
    tune.report({sweep.TIME_ATTR: 1, "loss": (config["x"] - 0.3) ** 2})


def test_an_optuna_sweep_resumes_with_its_searchers_state(ray_local, tmp_path):
    """`sweep.search=optuna`: Optuna's TPE (2 random trials first) over one dimension, one trial at
    a time. The driver is interrupted after the second trial and the sweep restored: the
    searcher saved with the finished sweep holds all four trials with the values they reported,
    those the earlier driver ran included (a searcher started afresh would hold only the rest)."""
    import pickle
    import signal

    import optuna
    from ray import tune
    from ray.tune import Callback

    marker = tmp_path / "interrupted"

    class InterruptAfterTwoTrials(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if sum(t.status == "TERMINATED" for t in trials) >= 2 and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends the run, its state saved

    cfg = compose_job(["sweep.search=optuna", "sweep.seed=0", "sweep.startup_trials=2"])
    params, by_index = sweep.search_space({"x": {"uniform": [0.0, 1.0]}}, cfg.sweep.search)
    assert by_index == {}
    first = tune.Tuner(
        quadratic, param_space=params,
        tune_config=tune.TuneConfig(metric="loss", mode="min", search_alg=sweep.searcher(cfg.sweep), num_samples=4,
                                    max_concurrent_trials=1),
        run_config=tune.RunConfig(name="optuna", storage_path=str(tmp_path), callbacks=[InterruptAfterTwoTrials()],
                                  verbose=0)).fit()
    earlier = {r.config["x"]: r.metrics["loss"] for r in first if r.metrics}
    assert 2 <= len(earlier) < 4, earlier
    resumed = tune.Tuner.restore(str(tmp_path / "optuna"), trainable=quadratic, resume_unfinished=True).fit()
    assert len(resumed) == 4
    (state_file,) = sorted((tmp_path / "optuna").glob("searcher-state-*.pkl"))[-1:]
    study = pickle.loads(state_file.read_bytes())["_ot_study"]
    done = {t.params["x"]: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(done) == 4 and all(done[x] == pytest.approx(v) for x, v in earlier.items()), (done, earlier)


def test_optuna_names_non_scalar_choices_by_index():
    """Optuna's categorical values must be scalars: a choice among anchor size lists is a choice
    among their indices, mapped back to the values for the trial's config and the summary."""
    sizes = [[[8], [16], [32], [64], [128]], [[16], [32], [64], [128], [256]]]
    space = {"model.anchors.sizes": {"grid": sizes}, "model.backbone.name": {"choice": ["resnet18", "resnet34"]}}
    params, by_index = sweep.search_space(space, "optuna")
    assert by_index == {"model.anchors.sizes": sizes}
    assert params["model.anchors.sizes"].categories == [0, 1]
    assert params["model.backbone.name"].categories == ["resnet18", "resnet34"]
    assert sweep.swept_values({"model.anchors.sizes": 1, "model.backbone.name": "resnet34"}, by_index) == \
        {"model.anchors.sizes": sizes[1], "model.backbone.name": "resnet34"}
    grid, _ = sweep.search_space(space, "grid")
    assert grid["model.anchors.sizes"] == {"grid_search": sizes}


def test_promote_moves_champion_only_to_a_better_candidate(ray_local, gapped_shapes, tmp_path):
    """On a val split whose ground truth is what model A predicts (so A's AP is high whatever its
    weights): a blind model (its classifier always says background: no detection, AP 0) is
    champion; A, the candidate, beats it and becomes champion; a blind candidate then does not
    replace A. Each decision is an MLflow run with both evaluations."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    cfg = compose_job(["model.backbone.name=resnet18", *MODEL])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    labels = {"category_ids": [3, 7, 11], "names": ["circle", "square", "triangle"]}
    runs = {}
    for name in ("a", "blind"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if name == "blind":
            bias = state["roi_heads.box_predictor.cls_score.bias"]
            bias[:] = -100.0
            bias[0] = 100.0
        runs[name] = start_or_resume_run(uri, "maskrcnn", name, {"model": as_dict(cfg.model)})
        log_model(uri, runs[name], {"model": state, "model_config": model.cfg.to_dict(), "label_map": labels})
    judged = its_own_ground_truth(model, gapped_shapes, tmp_path / "judged")
    overrides = [f"output_dir={tmp_path / 'out'}", f"data.root={judged}", "data.generate=null", *MODEL]
    blind = registry_version(client, uri, runs["blind"], overrides)
    models_cli(["--tracking-uri", uri, "alias", "shapes-promote", blind, "champion"])
    a = registry_version(client, uri, runs["a"], overrides)
    judge = compose_job([*overrides, f"tracking.tracking_uri={uri}"])
    better = promote.promote(judge, "shapes-promote", metric="segm_AP50")
    assert better["champion_segm_AP50"] == 0 and better["candidate_segm_AP50"] > 0, better
    assert better["decision"] == f"promoted version {a}"
    assert str(client.get_model_version_by_alias("shapes-promote", "champion").version) == a

    worse_version = registry_version(client, uri, runs["blind"], overrides)  # alias candidate
    worse = promote.promote(judge, "shapes-promote", metric="segm_AP50")
    assert worse["decision"].startswith(f"kept version {a}") and worse["candidate"] == worse_version
    assert str(client.get_model_version_by_alias("shapes-promote", "champion").version) == a
    decided = client.get_run(worse["run_id"])
    assert decided.data.metrics["candidate/segm_AP50"] == 0 and decided.data.metrics["champion/segm_AP50"] > 0
    assert decided.data.tags["decision"] == worse["decision"]
    assert client.get_model_version("shapes-promote", worse_version).tags["promotion"] == worse["decision"]


def registry_version(client, url: str, run_id: str, overrides: list[str]) -> str:
    """`mrcnn-models register RUN_ID shapes-promote`; returns the new version."""
    models_cli(["--tracking-uri", url, "register", run_id, "shapes-promote", "--", *overrides])
    return str(client.get_model_version_by_alias("shapes-promote", "candidate").version)
