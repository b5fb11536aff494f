"""The Ray internals the jobs rely on, in one place, each with what it is for.

Checked against Ray 2.60, the range `pyproject.toml` pins: Ray's private modules change between
minor releases, so a Ray outside it gets a warning here, at import, instead of a failure deep
inside a job.
"""

from __future__ import annotations

import warnings
from typing import Any

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: F401 - re-exported
from ray.train import DataConfig

RAY_CHECKED = "2.60"

if not ray.__version__.startswith(RAY_CHECKED + "."):
    warnings.warn(f"mrcnn's workflows were checked against Ray {RAY_CHECKED}.x, this is Ray {ray.__version__}: "
                  "workflows/runtime/ray_internals.py names the internals to check", stacklevel=1)


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
