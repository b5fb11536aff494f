"""What Ray's and MLflow's loggers show on a job's console. Standard library only at import: a
local Ray instance runs `quiet_ray_process` in every worker process it starts, before any task,
and importing the jobs' modules there would cost each process their imports (MLflow and Ray
Train: about 1.7 s of CPU here)."""

from __future__ import annotations

import logging
import warnings


def quiet_consoles(*logger_names: str) -> None:
    """Raise the console handlers of these loggers ("" for the root) to WARNING; their file
    handlers keep every line. Ray configures its own loggers with a console handler beside a
    session-log file handler (Ray Data on import, Ray Train in each worker), so the level is set
    on the handler, not on the logger."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


def quiet_ray_process() -> None:
    """A local Ray instance's worker setup hook: Ray Data's and Ray Train's routine INFO lines and
    the deprecation warning Ray Train's own dataset manager raises stay out of the console."""
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    import ray.data  # noqa: F401 - configures Ray Data's loggers, whose console is then raised

    quiet_consoles("ray.data", "ray.train", "")
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data warns when its bars are off
        handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars"))
