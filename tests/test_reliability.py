"""Bad input answered clearly, before any Ray work; weights that would run code refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from mrcnn.checkpoint import (
    UnsafeWeightsError,
    load_checkpoint,
    load_torchvision_weights,
    load_weights_file,
    write_model_files,
)
from mrcnn.data.images import ImageDecodeError, decode_image
from tests.helpers.jobs import compose_job, tiny
from tests.helpers.servers import free_port
from workflows.jobs.train import run
from workflows.logged_model import read_model_dir


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker))}, f)
    for load in (load_weights_file, load_checkpoint,
                 lambda p: load_torchvision_weights(torch.nn.Linear(1, 1), p)):
        with pytest.raises(UnsafeWeightsError, match="evil.pt was refused"):
            load(evil)
    # The same file inside a logged-model folder.
    cfg = compose_job(["model.num_classes=2", "model.backbone.name=resnet18"]).model.to_dict()
    folder = write_model_files(tmp_path / "model", {}, cfg, {"category_ids": [1], "names": ["a"]})
    (folder / "weights.pt").write_bytes(evil.read_bytes())
    with pytest.raises(UnsafeWeightsError):
        read_model_dir(folder)
    assert not marker.exists()


def test_mlflow_refuses_a_pickled_model_here_and_in_ray_workers(ray_local, tmp_path):
    """The suite runs as a cautious deployment: MLflow refuses to unpickle a model, in the tests'
    process and in the Ray workers the jobs run in (they inherit the setting)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    path = str(tmp_path / "pickled")
    mlflow.pyfunc.save_model(path, python_model=Echo())
    with pytest.raises(MlflowException, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        mlflow.pyfunc.load_model(path)

    @ray_local.remote
    def load_in_a_worker(p: str) -> str:
        try:
            mlflow.pyfunc.load_model(p)
        except MlflowException as e:
            return str(e)
        return "loaded"

    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" in ray_local.get(load_in_a_worker.remote(path))


def test_unreachable_tracking_server_fails_before_training(gapped_shapes, tmp_path):
    import ray

    ray.shutdown()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"tracking.tracking_uri={url}: no MLflow server answers"):
        run(tiny(tmp_path / "out", gapped_shapes, f"tracking.tracking_uri={url}"))
    assert not ray.is_initialized() and not (tmp_path / "out" / "ray_results").exists()


def test_unwritable_output_dir_fails_before_training(gapped_shapes, tmp_path):
    import ray

    ray.shutdown()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"output_dir={blocker}/out is not writable"):
        run(tiny(blocker / "out", gapped_shapes))
    assert not ray.is_initialized()


def test_a_missing_dataset_is_named_before_ray(tmp_path):
    import ray

    ray.shutdown()
    with pytest.raises(FileNotFoundError, match=r"data.train_annotations: .*/nowhere/annotations/"
                                                r"instances_train.json does not exist \(data.root="):
        run(tiny(tmp_path / "out", tmp_path / "nowhere"))
    assert not ray.is_initialized()


def test_annotations_with_nothing_usable_stop_before_training(gapped_shapes, tmp_path):
    """Every annotation broken (degenerate polygon, zero-area box, unknown category): the job stops
    before Ray with the report naming what and where."""
    import json
    import shutil

    import ray

    ray.shutdown()
    root = tmp_path / "data"
    shutil.copytree(gapped_shapes, root)
    path = root / "annotations/instances_train.json"
    coco = json.loads(path.read_text())
    for i, a in enumerate(coco["annotations"]):
        a.update([({"segmentation": [[1, 1, 2, 2]]}), ({"bbox": [1, 1, 0, 0]}), ({"category_id": 999})][i % 3])
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"(?s)data.train_annotations: .*instances_train.json has no usable "
                                         r"annotation.*degenerate polygon.*unknown category id"):
        run(tiny(tmp_path / "out", root))
    assert not ray.is_initialized()


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"GIF89a but not really", "not an image format"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 20, "cannot decode image x.jpg"),
])
def test_bad_image_bytes_get_a_message_naming_the_file(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, "x.jpg")
