"""MLflow runs: metric sections, the composed and derived config each labelled on a run, the
SQLite store's path."""

from __future__ import annotations

from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from workflows.tracking import metric_key, sqlite_path, start_or_resume_run


def test_metric_keys_fall_into_the_ui_sections():
    assert metric_key("segm_AP") == "val/segm_AP" and metric_key("bbox_AP50") == "val/bbox_AP50"
    assert metric_key("images_per_s") == "system/images_per_s"
    assert metric_key("loss_mask") == "train/loss_mask" and metric_key("lr") == "train/lr"
    assert metric_key("infer/images") == "infer/images"


def test_a_run_records_the_composed_config_and_what_was_derived_apart(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_or_resume_run(uri, "maskrcnn", "r", {"model": {"num_classes": 0}, "output_dir": "outputs"},
                                 derived={"model.num_classes": 4, "output_dir": "/abs/outputs", "unset": None})
    client = MlflowClient(uri)
    params = client.get_run(run_id).data.params
    assert params["model.num_classes"] == "0" and params["derived.model.num_classes"] == "4"
    assert params["output_dir"] == "outputs" and params["derived.output_dir"] == "/abs/outputs"
    assert "derived.unset" not in params
    folder = Path(client.download_artifacts(run_id, "", str(tmp_path / "a")))
    assert yaml.safe_load((folder / "config.yaml").read_text()) == {"model": {"num_classes": 0},
                                                                     "output_dir": "outputs"}
    assert yaml.safe_load((folder / "derived.yaml").read_text()) == {"model.num_classes": 4,
                                                                      "output_dir": "/abs/outputs"}


def test_sqlite_path_of_a_tracking_uri():
    assert sqlite_path("sqlite:////data/mlflow.db") == Path("/data/mlflow.db")
    assert sqlite_path("http://server:5000") is None
