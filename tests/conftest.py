import os
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import become_subreaper

# Whatever a test starts stays among this process's descendants, to be stopped by PID.
become_subreaper()
# Every test runs as a cautious deployment would: MLflow may never unpickle a model (ours are
# state dicts + JSON). Set before any Ray worker starts, so workers inherit it.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray instance for a test module (4 logical CPUs: 2 train workers + data tasks)."""
    import ray

    # Workers import the tests' own train loops (tests.helpers) from the project's folder.
    pythonpath = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    from mrcnn.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=12, val=5, size=96, seed=0)


@pytest.fixture(scope="session")
def gapped_shapes(tmp_path_factory):
    """Shapes with category ids 3, 7, 11: predictions must come back with those ids."""
    import json

    from mrcnn.data.shapes import write_shapes_dataset

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
