"""`mrcnn-tune`: sweep backbones, anchors (any config key) with Ray Tune and ASHA early stopping.

    mrcnn-tune                                            # sweep/backbones_anchors on the shapes demo
    mrcnn-tune sweep.name=s1 sweep.scheduler.max_epochs=6 # rerun the same name: the sweep resumes
    mrcnn-tune '+sweep.space.trainer.optimizer.lr={loguniform:[3e-4,3e-3]}'

Every trial is a TorchTrainer built by `workflows.training.trainer.build_trainer` and fitted inside a Tune
function trainable; its workers report each epoch, and `TuneReportCallback` hands rank 0's
metrics to Tune (ASHA's clock is the reported `epochs_completed`). MLflow: one parent run per
sweep, one child run per trial; the best trial's model is registered with `sweep.register_alias`.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from workflows.checks import flatten_space
from workflows.config import JobConfig, SweepConfig, as_dict, training_params, with_values
from workflows.jobs.frame import Job, new_run_name
from workflows.jobs.train import starting_point, starting_point_tags
from workflows.logged_model import log_checkpoint
from workflows.registry import DEFAULT_MODEL_NAME, register_model, run_model_id
from workflows.runtime.ray_internals import asha_record
from workflows.storage import join, ray_storage, to_uri
from workflows.tracking import log_metrics, mlflow_client, start_or_resume_run
from workflows.training.trainer import TrainingData, TrainingRun, build_trainer, load_training_data

TIME_ATTR = "epochs_completed"
# The trial driver only builds and waits on its TorchTrainer: holding a CPU would deadlock it
# against its own workers on a small machine. A bundle must not be empty, so it asks for a
# token of memory, which every node has.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 16 * 2**20}


class ResumableASHA(ASHAScheduler):
    """ASHA that knows, in a resumed sweep, what the earlier driver's trials reported. Tune
    restores the trials of a killed driver but starts the scheduler afresh: its rungs would be
    empty, and a bad trial reaching a rung first after the restart would run to the end. Each
    restored trial's reports (its `result.json`, else its last result) are replayed into its
    bracket as they came, so the rungs are those the sweep had set."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        for result in earlier_reports(trial):
            asha_record(self, trial, result)


def earlier_reports(trial) -> list[dict[str, Any]]:
    """The results a restored trial had reported, oldest first ([] for a new trial)."""
    last = trial.run_metadata.last_result
    if TIME_ATTR not in last:
        return []
    try:
        with trial.storage.storage_filesystem.open_input_stream(posixpath.join(trial.path, "result.json")) as f:
            reports = [json.loads(line) for line in f.readall().decode().splitlines() if line.strip()]
    except (OSError, ValueError):
        reports = []
    if not reports or reports[-1].get(TIME_ATTR, -1) < last[TIME_ATTR]:  # the file lagged behind
        reports.append(last)
    return reports


SCALARS = (str, int, float, bool, type(None))


def search_space(space: dict[str, dict[str, Any]], search: str) -> tuple[dict[str, Any], dict[str, list]]:
    """Tune's param_space for `sweep.space` under the searcher `search`, and the dimensions it
    names by their index into the values (Optuna's categorical values must be scalars: a choice
    among anchor size lists is a choice among their indices). A grid is enumerated only by
    `grid`; the other searchers draw from its values."""
    params, by_index = {}, {}
    for path, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind in ("uniform", "loguniform"):
            params[path] = getattr(tune, kind)(*values)
        elif kind == "grid" and search == "grid":
            params[path] = tune.grid_search(values)
        elif search == "optuna" and not all(isinstance(v, SCALARS) for v in values):
            params[path], by_index[path] = tune.choice(list(range(len(values)))), list(values)
        else:
            params[path] = tune.choice(values)
    return params, by_index


def swept_values(params: dict[str, Any], by_index: dict[str, list]) -> dict[str, Any]:
    """A trial's config (Tune's `params`) as the swept keys' values."""
    return {k: by_index[k][v] if k in by_index else v for k, v in params.items()}


def searcher(sweep: SweepConfig):
    """The search algorithm of `sweep.search` (None: Tune's variant generator, the grid)."""
    if sweep.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.seed)
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed,
                                                               n_startup_trials=sweep.startup_trials))
    return None


class TrialRuns(Callback):
    """Ends each trial's MLflow run when its trial ends (completed, stopped early by ASHA, or
    failed), with its status and the time it ended: the MLflow UI compares trials by how long
    they ran."""

    def __init__(self, tracking_uri: str, parent_run_id: str, max_epochs: int):
        self.tracking_uri, self.parent_run_id, self.max_epochs = tracking_uri, parent_run_id, max_epochs

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        done = trial.last_result.get(TIME_ATTR, 0)
        self._end(trial, "FINISHED", "completed" if done >= self.max_epochs else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FAILED", "failed")

    def _end(self, trial, status: str, outcome: str) -> None:
        client = mlflow_client(self.tracking_uri)
        parent, trial_id = self.parent_run_id, trial.trial_id
        try:
            runs = client.search_runs([client.get_run(parent).info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                    f"tags.trial_id = '{trial_id}'")
            for run in runs:
                client.set_tag(run.info.run_id, "sweep.status", outcome)
                client.set_terminated(run.info.run_id, status=status)
        except Exception as e:  # noqa: BLE001 - the sweep goes on; finish_sweep sets the status again
            print(f"WARNING: could not end the MLflow run of trial {trial.trial_id}: {str(e).splitlines()[0][:200]}")


def trial_config(base: JobConfig, params: dict[str, Any], max_epochs: int) -> JobConfig:
    """The job config of one trial (a new object): the swept values set, every epoch evaluated
    and checkpointed (ASHA compares trials at each epoch)."""
    return with_values(base, {**params, "trainer.epochs": max_epochs, "trainer.eval_every_epochs": 1,
                              "trainer.checkpoint_every_epochs": 1})


@dataclass(frozen=True)
class Sweep:
    """What every trial of a sweep is given beside the config: what the sweep's driver derived."""

    name: str
    parent_run_id: str
    tracking_uri: str
    max_epochs: int
    trials_dir: str  # path or URI: each trial's Ray Train run under it, by trial id
    init_weights: str | None  # trainer.init_weights resolved once for every trial
    derived: dict[str, Any]  # the sweep's derived values, recorded on every trial's run
    by_index: dict[str, list]  # the dimensions Tune's params name by their index (`search_space`)


def run_trial(params: dict[str, Any], base: JobConfig, data: TrainingData, sweep: Sweep) -> None:
    """One trial (runs in a Tune actor that holds no CPU): build and fit the trial's TorchTrainer,
    logging to a child run of the sweep's MLflow run."""
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    params = swept_values(params, sweep.by_index)
    cfg = trial_config(base, params, sweep.max_epochs)
    uri = sweep.tracking_uri
    run_id = start_or_resume_run(
        uri, cfg.tracking.experiment, f"{sweep.name}-{trial_id}", training_params(cfg),
        tags={"mlflow.parentRunId": sweep.parent_run_id, "sweep": sweep.name, "job": "train",
              "trial_id": trial_id, **{f"sweep.{k}": str(v) for k, v in params.items()}},
        derived=sweep.derived)
    # Nested under the sweep's folder with the trial's stable id: a resumed sweep resumes this
    # Train run, and another sweep never does.
    training = TrainingRun.of(cfg, data, run_id, uri, sweep.init_weights)
    trainer = build_trainer(cfg, data, training, storage_path=sweep.trials_dir, name=trial_id,
                            callbacks=[TuneReportCallback()])
    trainer.fit()
    # Nothing after fit(): Tune stops a trial's actor as soon as the trial reports its last
    # epoch (ASHA's max_t) or is stopped early, so the sweep's driver logs each trial's model.


def trial_outcome(result, max_epochs: int) -> str:
    if result.error is not None:
        return "failed"
    done = (result.metrics or {}).get(TIME_ATTR, 0)
    return "completed" if done >= max_epochs else "stopped early"


def summarize(results, space: dict[str, Any], metric: str, mode: str, max_epochs: int,
              by_index: dict[str, list]) -> list[dict[str, Any]]:
    """One row a trial: swept values, best metric, epochs run, status, checkpoint."""
    rows = []
    for r in results:
        history = r.metrics_dataframe
        values = [] if history is None or metric not in history else [v for v in history[metric] if v == v]
        best = (max(values) if mode == "max" else min(values)) if values else float("nan")
        cfg = r.config or {}
        last = r.metrics or {}
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id", Path(r.path).name if r.path else ""),
            **swept_values({k: cfg.get(k) for k in space}, by_index),
            f"best_{metric}": best,
            "epochs": int((r.metrics or {}).get(TIME_ATTR, 0)),
            "status": trial_outcome(r, max_epochs),
            "checkpoint": last.get("checkpoint_path"),
            "started": last.get("timestamp", 0) - last.get("time_total_s", 0),  # unix seconds
            "ended": last.get("timestamp", 0),
        })
    return rows


def plot_metric(rows: list[dict[str, Any]], space: dict[str, Any], metric: str, path: Path) -> None:
    """The best metric of each trial against each swept parameter (one panel a parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(space), figsize=(4.5 * len(space), 3.8), squeeze=False)
    key = f"best_{metric}"
    for ax, (name, spec) in zip(axes[0], space.items()):
        numeric = next(iter(spec)) in ("uniform", "loguniform")
        xs = [r[name] if numeric else str(r[name]) for r in rows]
        colours = ["tab:green" if r["status"] == "completed" else "tab:orange" if r["status"] == "stopped early"
                   else "tab:red" for r in rows]
        if numeric:
            ax.scatter(xs, [r[key] for r in rows], c=colours)
            if next(iter(spec)) == "loguniform":
                ax.set_xscale("log")
        else:
            cats = sorted(set(xs))
            ax.scatter([cats.index(x) for x in xs], [r[key] for r in rows], c=colours)
            ax.set_xticks(range(len(cats)), [c if len(c) < 24 else c[:21] + "..." for c in cats],
                          rotation=20, ha="right", fontsize=7)
        ax.set_xlabel(name)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{key} per trial (green completed, orange stopped early, red failed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def concurrent_trials(cfg: JobConfig, wanted: int) -> int:
    """At most as many trials as the cluster's CPUs hold: each needs its workers' CPUs plus one
    for its Ray Data decode tasks (more would starve the data pipeline and hang)."""
    per_trial = cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + 1
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, min(wanted, int(cpus // per_trial)))


def run(cfg: JobConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {parent_run_id, best, rows, version, tracking_uri}."""
    with Job(cfg, "sweep") as job:
        sweep_cfg = cfg.sweep
        space = flatten_space(sweep_cfg.space)
        data = load_training_data(cfg, job.paths)
        start = starting_point(cfg.trainer.init_weights, job.tracking_uri)
        max_epochs = sweep_cfg.scheduler.max_epochs or cfg.trainer.epochs
        job.start_ray()  # with the State API: it frees placement groups of stopped trials
        name = sweep_cfg.name or new_run_name("sweep")
        derived = {"model.num_classes": data.labels.num_classes, "trainer.init_weights": start and start.uri,
                   "sweep.name": name, "sweep.scheduler.max_epochs": max_epochs}
        parent = job.open_run("sweep", {"sweep": as_dict(sweep_cfg), **training_params(cfg)},
                              tags={"sweep": name, **starting_point_tags(start)}, name=name, derived=derived)
        sweeps_dir = join(job.paths.output_dir, "sweeps")
        param_space, by_index = search_space(space, sweep_cfg.search)
        sweep = Sweep(name, parent, job.tracking_uri, max_epochs, join(sweeps_dir, f"{name}/trials"),
                      start and start.uri, {**job.paths.labelled(), **derived}, by_index)
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg, data=data, sweep=sweep),
                                        TRIAL_DRIVER_RESOURCES)
        storage_path, fs = ray_storage(sweeps_dir, cfg.data.s3)
        path = posixpath.join(storage_path, name)
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            print(f"resuming sweep {name} from {join(sweeps_dir, name)}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            scheduler = ResumableASHA(time_attr=TIME_ATTR, max_t=max_epochs,
                                      grace_period=sweep_cfg.scheduler.grace_period,
                                      reduction_factor=sweep_cfg.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=sweep_cfg.metric, mode=sweep_cfg.mode, scheduler=scheduler,
                    search_alg=searcher(sweep_cfg), num_samples=sweep_cfg.num_samples,
                    max_concurrent_trials=concurrent_trials(cfg, sweep_cfg.max_concurrent_trials)),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                          callbacks=[TrialRuns(job.tracking_uri, parent, max_epochs)],
                                          verbose=1 if cfg.verbose else 0),
            )
        results = tuner.fit()
        return finish_sweep(cfg, results, space, sweep, job.paths.output_dir)


def finish_sweep(cfg: JobConfig, results, space: dict[str, Any], sweep: Sweep, output_dir: str) -> dict[str, Any]:
    """Tag every child run with how its trial ended; log the summary table, the plot and the
    best metric to the parent; register the best trial's model."""
    metric, mode, parent, uri = cfg.sweep.metric, cfg.sweep.mode, sweep.parent_run_id, sweep.tracking_uri
    client = mlflow_client(uri)
    rows = summarize(results, space, metric, mode, sweep.max_epochs, sweep.by_index)
    for row in rows:  # Tune reports paths inside the storage's filesystem
        row["checkpoint"] = row["checkpoint"] and to_uri(row["checkpoint"], like=output_dir)
    children = {r.data.tags.get("trial_id"): r.info.run_id for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    for row in rows:
        child = children.get(row["trial_id"])
        if child:
            client.set_tag(child, "sweep.status", row["status"])
            if client.get_run(child).info.status == "RUNNING":  # else ended with its trial (TrialRuns)
                client.set_terminated(child, status="FAILED" if row["status"] == "failed" else "FINISHED")
            if row["checkpoint"] and not run_model_id(client, child):  # a resumed sweep logged it before
                log_checkpoint(uri, child, row["checkpoint"], cfg.data.s3)
    key = f"best_{metric}"
    ranked = [r for r in rows if r[key] == r[key] and r["checkpoint"]]
    best = (max if mode == "max" else min)(ranked, key=lambda r: r[key]) if ranked else None
    with tempfile.TemporaryDirectory() as tmp:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)
        (Path(tmp) / "trials.csv").write_text(buf.getvalue())
        client.log_artifact(parent, str(Path(tmp) / "trials.csv"))
        if rows:
            plot_metric(rows, space, metric, Path(tmp) / f"{metric}_vs_params.png")
            client.log_artifact(parent, str(Path(tmp) / f"{metric}_vs_params.png"))
    version = None
    if best is not None:
        # Under the metric's own name: the parent sits on the same chart as its children.
        log_metrics(client, parent, {metric: best[key], "sweep/trials": len(rows),
                                     "sweep/trials_stopped_early": sum(r["status"] == "stopped early" for r in rows)},
                    0)
        client.set_tag(parent, "best_trial", best["trial_id"])
        child = children.get(best["trial_id"])
        if child:
            version = register_model(client, child, registered_name(cfg), cfg.sweep.register_alias)
    print_summary(rows, key, best, sweep.name, version, cfg, space)
    if best is not None and version is None:
        raise RuntimeError(f"the best trial {best['trial_id']} has no MLflow run under the sweep's run {parent}: "
                           "nothing registered; its checkpoint is " + str(best["checkpoint"]))
    return {"parent_run_id": parent, "best": best, "rows": rows, "version": version, "tracking_uri": uri,
            "children": children}


def registered_name(cfg: JobConfig) -> str:
    """The registered model the sweep's best trial becomes a version of."""
    return cfg.tracking.registered_model or DEFAULT_MODEL_NAME


def print_summary(rows, key, best, name, version, cfg: JobConfig, space) -> None:
    print(f"\nsweep {name}: {len(rows)} trials")
    for r in rows:
        value = f"{r[key]:.3f}" if r[key] == r[key] else "   - "
        params = " ".join(f"{k}={v}" for k, v in r.items() if k in space)
        print(f"  {r['trial_id']}  {key} {value}  epochs {r['epochs']}  {r['status']:13s} {params}")
    if best:
        print(f"best trial {best['trial_id']}: {key} {best[key]:.3f}; registered {registered_name(cfg)} "
              f"version {version} (alias {cfg.sweep.register_alias})")
    else:
        print("no trial reported the metric with a checkpoint: nothing registered; see the trials' logs")
    print("compare the trials in the MLflow UI: the sweep's run below, its child runs")

