"""Composing small job configs for the tests: typed, as a job's entry makes them."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.helpers.servers import empty_mlflow_store
from workflows.config import JobConfig, compose_config


def compose_job(overrides: list[str]) -> JobConfig:
    return compose_config(overrides)


def tiny(out: Path | str, root: Path, *extra: str) -> JobConfig:
    """A job on 64-pixel images, 2 a batch, logging every step. Its default SQLite store (when
    `out` is a writable folder) starts as a copy of an empty one (`empty_mlflow_store`)."""
    if not str(out).startswith("s3://"):
        with contextlib.suppress(OSError):  # an unwritable output_dir is some tests' subject
            empty_mlflow_store(Path(out) / "mlflow.db")
    return compose_job([
        f"output_dir={out}", f"data.root={root}", "data.generate=null",
        "model.transform.min_size=[64]", "model.transform.max_size=64",
        "model.roi_heads.score_thresh=0.0",
        "trainer.batch_size=2", "trainer.log_every_steps=1", "trainer.max_failures=0",
        "trainer.optimizer.warmup_steps=2", "tracking.log_images=2", *extra])
