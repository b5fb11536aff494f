"""A SQLite MLflow registry holding tiny Mask R-CNNs (64 px, categories 3, 7, 11 as in the
`gapped_shapes` data), for the jobs that load registered models."""

from __future__ import annotations

from pathlib import Path

import torch

from mrcnn import build_model
from tests.helpers.jobs import compose_job
from tests.helpers.servers import empty_mlflow_store
from workflows.config import as_dict
from workflows.logged_model import log_model
from workflows.registry import register_model
from workflows.tracking import mlflow_client, start_or_resume_run

TINY = ["model.transform.min_size=[64]", "model.transform.max_size=64", "model.num_classes=4"]
LABEL_MAP = {"category_ids": [3, 7, 11], "names": ["circle", "square", "triangle"]}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(compose_job(TINY).model)


def register_tiny_models(root: Path, name: str, seeds: tuple[int, ...] = (0,), alias: str = "champion"
                         ) -> tuple[str, list[str]]:
    """One logged run and registered version of `name` per seed (random weights), `alias` on the
    first -> (the registry's URI, the versions)."""
    uri = f"sqlite:///{empty_mlflow_store(root / 'mlflow.db')}"
    client = mlflow_client(uri)
    versions = []
    for seed in seeds:
        model = tiny_model(seed)
        run_id = start_or_resume_run(uri, "maskrcnn", f"{name}-{seed}", {"model": as_dict(model.cfg)})
        log_model(uri, run_id, {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                                "label_map": LABEL_MAP})
        versions.append(register_model(client, run_id, name, alias=None))
    client.set_registered_model_alias(name, alias, versions[0])
    return uri, versions


def assert_same_row(row: dict, want: dict) -> None:
    """A row served (the pyfunc's, mrcnn-serve's) is the one `mrcnn-infer` wrote for the same image, to
    the noise of predicting it in another batch."""
    assert row["error"] is None and (row["width"], row["height"]) == (want["width"], want["height"])
    assert row["labels"] == want["labels"] and row["category_names"] == want["category_names"]
    assert [m["counts"] for m in row["masks"]] == [m["counts"] for m in want["masks"]]
    assert torch.allclose(torch.tensor(row["boxes"]).reshape(-1, 4), torch.tensor(want["boxes"]).reshape(-1, 4),
                          atol=1e-4)
    assert torch.allclose(torch.tensor(row["scores"]), torch.tensor(want["scores"]), atol=1e-6)
