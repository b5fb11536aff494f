"""`mrcnn-models`: the MLflow model registry of our Mask R-CNNs.

    mrcnn-models list maskrcnn                      # versions, aliases, run, AP
    mrcnn-models register RUN_ID maskrcnn           # the run's logged model -> a new version
    mrcnn-models alias maskrcnn 3 champion
    mrcnn-models promote maskrcnn [--force] [-- data=coco data.root=/data/coco]

The tracking server is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else the jobs' default (the
SQLite file under output_dir). `promote` evaluates `candidate` and `champion` on the configured
val split (Hydra overrides after `--`), moves `champion` only when the candidate scores higher
(or with --force), and records both evaluations and the decision as an MLflow run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hydra import compose, initialize_config_dir
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workflows.config import CONF_DIR, register_configs, to_container
from workflows.evaluate import evaluate_model
from workflows.model_io import load_model, register_model
from workflows.tracking import log_metrics, metric_key, mlflow_client, resolve_tracking_uri, start_or_resume_run
from workflows.trainer import prepare

register_configs()


def job_config(overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return prepare(to_container(compose(config_name="config", overrides=overrides)))


def tracking_uri(arg: str | None, cfg: dict[str, Any]) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri(cfg["tracking"], cfg["output_dir"])


def list_versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        raise SystemExit(f"no registered model {name!r} at {client._registry_uri}") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        rows.append({"version": str(mv.version), "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                     "run_id": mv.run_id, "segm_AP": metrics.get(metric_key("segm_AP")),
                     "bbox_AP": metrics.get(metric_key("bbox_AP"))})
    return rows


def promote(client: MlflowClient, uri: str, name: str, cfg: dict[str, Any], metric: str = "segm_AP",
            force: bool = False, split: str = "val") -> dict[str, Any]:
    """Evaluate candidate and champion on `split`; move `champion` to the candidate if it is
    better (or `force`). Returns {decision, candidate, champion, <alias>_<metric>...}."""
    candidate = load_model(f"models:/{name}@candidate", uri)
    try:
        champion = load_model(f"models:/{name}@champion", uri)
    except ValueError:
        champion = None  # the first promotion
    scores = {"candidate": evaluate_model(candidate, cfg, split)}
    if champion is not None:
        scores["champion"] = evaluate_model(champion, cfg, split)
    cand, champ = scores["candidate"][metric], scores.get("champion", {}).get(metric, float("-inf"))
    if champion is not None and champion.version == candidate.version:
        decision = "unchanged: candidate is already champion"
    elif force or cand > champ:
        client.set_registered_model_alias(name, "champion", candidate.version)
        decision = f"promoted version {candidate.version}" + (" (forced)" if force and cand <= champ else "")
    else:
        decision = f"kept version {champion.version}: candidate {metric} {cand:.4f} <= champion {champ:.4f}"
    run_id = start_or_resume_run(uri, cfg["tracking"]["experiment"],
                                 f"promote-{name}-v{candidate.version}-{os.urandom(3).hex()}",
                                 {"model": name, "candidate_version": candidate.version,
                                  "champion_version": champion.version if champion else None,
                                  "metric": metric, "split": split, "force": force, "data": cfg["data"]},
                                 tags={"decision": decision})
    log_metrics(client, run_id, {f"{who}/{k}": v for who, m in scores.items() for k, v in m.items()}, 0)
    client.set_terminated(run_id)
    client.set_model_version_tag(name, candidate.version, "promotion", decision)
    return {"decision": decision, "candidate": candidate.version,
            "champion": champion.version if champion else None, "run_id": run_id,
            **{f"{who}_{metric}": m[metric] for who, m in scores.items()}}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="mrcnn-models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="versions, aliases, run and AP").add_argument("name")
    reg = sub.add_parser("register", help="register a run's logged model as a new version")
    reg.add_argument("run_id")
    reg.add_argument("name")
    reg.add_argument("--alias", default="candidate")
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
    cfg = job_config(overrides)
    uri = tracking_uri(a.tracking_uri, cfg)
    client = mlflow_client(uri)
    if a.command == "list":
        rows = list_versions(client, a.name)
        print(f"{'version':>7}  {'aliases':20s} {'run_id':34s} {'segm_AP':>8} {'bbox_AP':>8}")
        for r in rows:
            ap = [f"{r[k]:8.3f}" if r[k] is not None else f"{'-':>8}" for k in ("segm_AP", "bbox_AP")]
            print(f"{r['version']:>7}  {r['aliases']:20s} {r['run_id'] or '-':34s} {ap[0]} {ap[1]}")
    elif a.command == "register":
        version = register_model(client, a.run_id, a.name, a.alias)
        print(f"registered {a.name} version {version} from run {a.run_id} (alias {a.alias})")
    elif a.command == "alias":
        client.set_registered_model_alias(a.name, a.alias, a.version)
        print(f"{a.name}@{a.alias} -> version {a.version}")
    else:
        out = promote(client, uri, a.name, cfg, a.metric, a.force, a.split)
        print(out["decision"])
        for k, v in out.items():
            if k.endswith(a.metric):
                print(f"  {k}: {v:.4f}")


if __name__ == "__main__":
    main()
