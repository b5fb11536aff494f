"""`mrcnn-tune`: sweep backbones, anchors (any config key) with Ray Tune and ASHA early stopping.

    mrcnn-tune                                            # sweep/backbones_anchors on the shapes demo
    mrcnn-tune sweep.name=s1 sweep.scheduler.max_epochs=6 # rerun the same name: the sweep resumes
    mrcnn-tune '+sweep.space.trainer.optimizer.lr={loguniform:[3e-4,3e-3]}'

Every trial is a TorchTrainer built by `workflows.trainer.build_trainer` and fitted inside a Tune
function trainable; its workers report each epoch, and `TuneReportCallback` hands rank 0's
metrics to Tune (ASHA's clock is the reported `epochs_completed`). MLflow: one parent run per
sweep, one child run per trial; the best trial's model is registered with `sweep.register_alias`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from mrcnn.checkpoint import load_weights_file
from workflows.compat import asha_record
from workflows.config import flatten_space, set_path, training_params
from workflows.job import Job, new_run_name
from workflows.registry import DEFAULT_MODEL_NAME, log_model, register_model, run_model_id
from workflows.storage import join, local_file, ray_storage, to_uri
from workflows.tracking import log_metrics, mlflow_client, start_or_resume_run
from workflows.trainer import TrainingData, build_trainer, load_training_data

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


def tune_domain(spec: dict[str, Any]):
    kind, values = next(iter(spec.items()))
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    return getattr(tune, kind)(*values)  # uniform / loguniform (low, high)


def trial_config(base: dict[str, Any], params: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    """The job config of one trial: the swept values set, every epoch evaluated (ASHA compares
    trials at each epoch)."""
    cfg = copy.deepcopy(base)
    for path, value in params.items():
        set_path(cfg, path, value)
    cfg["trainer"]["epochs"] = max_epochs
    cfg["trainer"]["eval_every_epochs"] = 1
    cfg["trainer"]["checkpoint_every_epochs"] = 1
    return cfg


def run_trial(params: dict[str, Any], base: dict[str, Any], data: TrainingData, sweep: dict[str, Any]) -> None:
    """One trial (runs in a Tune actor that holds no CPU): build and fit the trial's TorchTrainer,
    logging to a child run of the sweep's MLflow run."""
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = trial_config(base, params, sweep["max_epochs"])
    uri = sweep["tracking_uri"]
    run_id = start_or_resume_run(
        uri, cfg["tracking"]["experiment"], f"{sweep['name']}-{trial_id}", cfg,
        tags={"mlflow.parentRunId": sweep["parent_run_id"], "sweep": sweep["name"], "job": "train",
              "trial_id": trial_id, **{f"sweep.{k}": str(v) for k, v in params.items()}})
    # Nested under the sweep's folder with the trial's stable id: a resumed sweep resumes this
    # Train run, and another sweep never does.
    trainer = build_trainer(cfg, data, run_id, uri, storage_path=sweep["trials_dir"], name=trial_id,
                            callbacks=[TuneReportCallback()])
    trainer.fit()
    # Nothing after fit(): Tune stops a trial's actor as soon as the trial reports its last
    # epoch (ASHA's max_t) or is stopped early, so the sweep's driver logs each trial's model.


def trial_outcome(result, max_epochs: int) -> str:
    if result.error is not None:
        return "failed"
    done = (result.metrics or {}).get(TIME_ATTR, 0)
    return "completed" if done >= max_epochs else "stopped early"


def summarize(results, space: dict[str, Any], metric: str, mode: str, max_epochs: int) -> list[dict[str, Any]]:
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
            **{k: cfg.get(k) for k in space},
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


def concurrent_trials(cfg: dict[str, Any], wanted: int) -> int:
    """At most as many trials as the cluster's CPUs hold: each needs its workers' CPUs plus one
    for its Ray Data decode tasks (more would starve the data pipeline and hang)."""
    per_trial = cfg["trainer"]["num_workers"] * cfg["trainer"]["cpus_per_worker"] + 1
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, min(wanted, int(cpus // per_trial)))


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {parent_run_id, best, rows, version, tracking_uri}."""
    with Job(cfg, "sweep") as job:
        cfg = job.cfg
        sweep_cfg = cfg["sweep"]
        space = flatten_space(sweep_cfg["space"])
        base = training_params(cfg)
        data = load_training_data(base)
        max_epochs = sweep_cfg["scheduler"]["max_epochs"] or base["trainer"]["epochs"]
        job.start_ray()  # with the State API: it frees placement groups of stopped trials
        name = sweep_cfg["name"] = sweep_cfg["name"] or new_run_name("sweep")
        parent = job.open_run("sweep", {"sweep": sweep_cfg, **base}, tags={"sweep": name}, name=name)
        sweeps_dir = join(cfg["output_dir"], "sweeps")
        sweep_info = {"name": name, "parent_run_id": parent, "tracking_uri": job.tracking_uri,
                      "max_epochs": max_epochs, "trials_dir": join(sweeps_dir, f"{name}/trials")}
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, data=data, sweep=sweep_info),
                                        TRIAL_DRIVER_RESOURCES)
        storage_path, fs = ray_storage(sweeps_dir, cfg["data"]["s3"])
        path = posixpath.join(storage_path, name)
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            print(f"resuming sweep {name} from {join(sweeps_dir, name)}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            scheduler = ResumableASHA(time_attr=TIME_ATTR, max_t=max_epochs,
                                      grace_period=sweep_cfg["scheduler"]["grace_period"],
                                      reduction_factor=sweep_cfg["scheduler"]["reduction_factor"])
            tuner = tune.Tuner(
                trainable,
                param_space={k: tune_domain(v) for k, v in space.items()},
                tune_config=tune.TuneConfig(
                    metric=sweep_cfg["metric"], mode=sweep_cfg["mode"], scheduler=scheduler,
                    num_samples=sweep_cfg["num_samples"],
                    max_concurrent_trials=concurrent_trials(base, sweep_cfg["max_concurrent_trials"])),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                          verbose=1 if cfg["verbose"] else 0),
            )
        results = tuner.fit()
        return finish_sweep(cfg, results, space, parent, job.tracking_uri, max_epochs, name)


def finish_sweep(cfg, results, space, parent: str, uri: str, max_epochs: int, name: str) -> dict[str, Any]:
    """Tag every child run with how its trial ended; log the summary table, the plot and the
    best metric to the parent; register the best trial's model."""
    sweep_cfg = cfg["sweep"]
    metric, mode = sweep_cfg["metric"], sweep_cfg["mode"]
    client = mlflow_client(uri)
    rows = summarize(results, space, metric, mode, max_epochs)
    for row in rows:  # Tune reports paths inside the storage's filesystem
        row["checkpoint"] = row["checkpoint"] and to_uri(row["checkpoint"], like=cfg["output_dir"])
    children = {r.data.tags.get("trial_id"): r.info.run_id for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    for row in rows:
        child = children.get(row["trial_id"])
        if child:
            client.set_tag(child, "sweep.status", row["status"])
            client.set_terminated(child, status="FAILED" if row["status"] == "failed" else "FINISHED")
            if row["checkpoint"] and not run_model_id(client, child):  # a resumed sweep logged it before
                log_trial_model(uri, child, row["checkpoint"], cfg["data"]["s3"])
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
        registered = cfg["tracking"]["registered_model"] or DEFAULT_MODEL_NAME
        if child:
            version = register_model(client, child, registered, sweep_cfg["register_alias"])
    print_summary(rows, key, best, name, version, cfg, space)
    if best is not None and version is None:
        raise RuntimeError(f"the best trial {best['trial_id']} has no MLflow run under the sweep's run {parent}: "
                           "nothing registered; its checkpoint is " + str(best["checkpoint"]))
    return {"parent_run_id": parent, "best": best, "rows": rows, "version": version, "tracking_uri": uri,
            "children": children}


def log_trial_model(uri: str, run_id: str, checkpoint_dir: str, s3: dict[str, Any]) -> None:
    """A trial's last checkpoint as its run's logged model, linked to the evaluation of the same
    step (trials evaluate every epoch)."""
    with local_file(join(checkpoint_dir, "checkpoint.pt"), s3) as path:
        payload = load_weights_file(path)
    log_model(uri, run_id, payload, step=payload.get("step"))


def print_summary(rows, key, best, name, version, cfg, space) -> None:
    print(f"\nsweep {name}: {len(rows)} trials")
    for r in rows:
        value = f"{r[key]:.3f}" if r[key] == r[key] else "   - "
        params = " ".join(f"{k}={v}" for k, v in r.items() if k in space)
        print(f"  {r['trial_id']}  {key} {value}  epochs {r['epochs']}  {r['status']:13s} {params}")
    if best:
        registered = cfg["tracking"]["registered_model"] or DEFAULT_MODEL_NAME
        print(f"best trial {best['trial_id']}: {key} {best[key]:.3f}; registered {registered} version {version} "
              f"(alias {cfg['sweep']['register_alias']})")
    else:
        print("no trial reported the metric with a checkpoint: nothing registered; see the trials' logs")
    print("compare the trials in the MLflow UI: the sweep's run below, its child runs")

