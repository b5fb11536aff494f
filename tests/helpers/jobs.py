"""Composing small job configs for the tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from workflows.config import CONF_DIR, register_configs, to_container

register_configs()


def compose_job(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_container(compose(config_name="config", overrides=overrides))


def tiny(out: Path, root: Path, *extra: str) -> dict:
    return compose_job([
        f"output_dir={out}", f"data.root={root}", "data.generate=null",
        "model.transform.min_size=[64]", "model.transform.max_size=64",
        "model.roi_heads.score_thresh=0.0",
        "trainer.batch_size=2", "trainer.log_every_steps=1", "trainer.max_failures=0",
        "trainer.optimizer.warmup_steps=2", "tracking.log_images=2", *extra])
