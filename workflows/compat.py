"""The Ray internals the jobs rely on, in one place, each with what it is for.

Checked against Ray 2.60, the range `pyproject.toml` pins: Ray's private modules change between
minor releases, so a Ray outside it gets a warning here, at import, instead of a failure deep
inside a job.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: F401 - re-exported
from ray.train import DataConfig

RAY_CHECKED = "2.60"

if not ray.__version__.startswith(RAY_CHECKED + "."):
    warnings.warn(f"mrcnn's workflows were checked against Ray {RAY_CHECKED}.x, this is Ray {ray.__version__}: "
                  "workflows/compat.py names the internals to check", stacklevel=1)


def operator_progress(executor: Any) -> tuple:
    """What changes when a streaming executor does anything: per operator, tasks submitted,
    outputs made and taken, and blocks queued (`StreamingExecutor._topology`, private)."""
    return tuple((op.metrics.num_tasks_submitted, op.metrics.num_task_outputs_generated,
                  op.metrics.num_outputs_taken, op_state.output_queue.num_blocks)
                 for op, op_state in executor._topology.items())


def execution_options(config: DataConfig, dataset_name: str) -> Any:
    """The ExecutionOptions Ray Train's DataConfig gives a dataset (its private resolver): a
    DataConfig subclass that shards differently keeps Ray Train's resource limits."""
    return config._resolve_execution_options(dataset_name)


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
    """In a Ray worker process: Ray Data's and Ray Train's routine INFO lines and the
    deprecation warning Ray Train's own dataset manager raises stay out of the console."""
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    import ray.data  # noqa: F401 - configures Ray Data's loggers, whose console is then raised

    quiet_consoles("ray.data", "ray.train", "")
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data warns when its bars are off
        handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars"))


def asha_record(scheduler: Any, trial: Any, result: dict[str, Any]) -> None:
    """Record `result` in the rungs of `trial`'s ASHA bracket as its report would have been,
    without acting on the decision (`AsyncHyperBandScheduler._trial_info`, `_time_attr`,
    `_metric`, `_metric_op` and `_Bracket.on_result`, private): a resumed sweep's scheduler
    learns what its trials reported before the restart."""
    if scheduler._time_attr in result and scheduler._metric in result:
        scheduler._trial_info[trial.trial_id].on_result(
            trial, result[scheduler._time_attr], scheduler._metric_op * result[scheduler._metric])


def checkpoint_destination() -> tuple[Any, str, str]:
    """(storage filesystem, folder, folder name) where Ray Train keeps this run's next checkpoint,
    for a worker that writes it there itself and reports it with `CheckpointUploadMode.NO_UPLOAD`
    (`get_storage()` is a DeveloperAPI, its StorageContext internal)."""
    storage = ray.train.get_context().get_storage()
    name = storage.make_default_checkpoint_dir_name()
    return storage.storage_filesystem, storage.build_checkpoint_path_from_name(name), name
