"""The command-line entry points: arguments wired to the jobs, nothing else.

    mrcnn-train    [Hydra overrides]          workflows.jobs.train.run
    mrcnn-tune     [Hydra overrides]          workflows.jobs.tune.run
    mrcnn-evaluate +weights=URI [+split=val]  workflows.jobs.evaluate.run
    mrcnn-infer    infer.input=... infer.output=...   workflows.jobs.infer.run
    mrcnn-serve    [serve.model=models:/NAME@ALIAS]   workflows.jobs.serve.run
    mrcnn-models   list|register|alias|promote        workflows.jobs.models
    mrcnn-shapes   --out DIR                  mrcnn.data.shapes

Every Hydra command takes `--cfg job` (print the composed config) and `verbose=true` (Ray's
routine output on the console too). A job that fails exits non-zero with its error. Each job's
module is imported when its command runs: `mrcnn-models list` never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import hydra
from omegaconf import DictConfig, open_dict

from workflows.config import CONF_DIR, ShapesGenConfig, compose_config, register_configs, typed, with_values

register_configs()


def _hydra_main(fn):
    return hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(fn)


@_hydra_main
def train(cfg: DictConfig) -> None:
    from workflows.jobs import train as job

    job.run(typed(cfg))


@_hydra_main
def tune(cfg: DictConfig) -> None:
    from workflows.jobs import tune as job

    job.run(typed(cfg))


@_hydra_main
def infer(cfg: DictConfig) -> None:
    from workflows.jobs import infer as job

    job.run(typed(cfg))


@_hydra_main
def serve(cfg: DictConfig) -> None:
    from workflows.jobs import serve as job

    job.run(typed(cfg))


@_hydra_main
def evaluate(cfg: DictConfig) -> None:
    from workflows.jobs import evaluate as job

    with open_dict(cfg):  # the command's own two arguments, beside the job config
        weights, split = cfg.pop("weights", None), cfg.pop("split", "val")
    if not weights:
        raise SystemExit("mrcnn-evaluate needs +weights=PATH/checkpoint.pt or +weights=models:/NAME@ALIAS")
    job.run(typed(cfg), weights, split)


MODELS_HELP = """The MLflow model registry of our Mask R-CNNs.

    mrcnn-models list maskrcnn                      # versions, aliases, run, AP
    mrcnn-models register RUN_ID maskrcnn           # the run's logged model -> a new version
    mrcnn-models alias maskrcnn 3 champion
    mrcnn-models promote maskrcnn [--force] [-- data=coco data.root=/data/coco]

The tracking server is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else the jobs' default (the
SQLite file under output_dir). `promote` evaluates `candidate` and `champion` on the configured
val split (Hydra overrides after `--`), moves `champion` only when the candidate scores higher
(or with --force), and records both evaluations and the decision as an MLflow run.
"""


def models(argv: list[str] | None = None) -> None:
    from workflows.jobs import models as job
    from workflows.registry import CANDIDATE, register_model
    from workflows.tracking import mlflow_client, resolve_tracking_uri

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="mrcnn-models", description=MODELS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="versions, aliases, run and AP").add_argument("name")
    reg = sub.add_parser("register", help="register a run's logged model as a new version")
    reg.add_argument("run_id")
    reg.add_argument("name")
    reg.add_argument("--alias", default=CANDIDATE)
    al = sub.add_parser("alias", help="point ALIAS at VERSION")
    al.add_argument("name")
    al.add_argument("version")
    al.add_argument("alias")
    pr = sub.add_parser("promote", help="evaluate candidate vs champion; move champion if better")
    pr.add_argument("name")
    pr.add_argument("--metric", default="segm_AP")
    pr.add_argument("--split", default="val")
    pr.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    uri = a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    cfg = compose_config(overrides)
    if uri:
        cfg = with_values(cfg, {"tracking.tracking_uri": uri})
    if a.command == "promote":
        job.promote(cfg, a.name, a.metric, a.force, a.split)
        return
    uri = resolve_tracking_uri(cfg.tracking, os.path.abspath(cfg.output_dir))
    client = mlflow_client(uri)
    try:
        if a.command == "list":
            print(job.versions_table(client, a.name, uri))
        elif a.command == "register":
            version = register_model(client, a.run_id, a.name, a.alias)
            print(f"registered {a.name} version {version} from run {a.run_id} (alias {a.alias})")
        else:
            print(job.set_alias(client, a.name, a.version, a.alias))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def shapes(argv: list[str] | None = None) -> None:
    """`mrcnn-shapes`: write the synthetic shapes dataset in COCO format."""
    from mrcnn.data.shapes import write_shapes_dataset

    p = argparse.ArgumentParser(prog="mrcnn-shapes", description=shapes.__doc__)
    p.add_argument("--out", required=True, help="output folder")
    d = ShapesGenConfig()
    p.add_argument("--train", type=int, default=d.train, help="training images")
    p.add_argument("--val", type=int, default=d.val, help="validation images")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    for name in ("train", "val", "size"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0")
    out = write_shapes_dataset(a.out, a.train, a.val, a.size, a.seed)
    print(f"wrote {a.train} train + {a.val} val images and annotations/instances_{{train,val}}.json to {out}")
