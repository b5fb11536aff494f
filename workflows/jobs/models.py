"""`mrcnn-models`: the registry's versions and aliases, and promotion.

    list_versions_table(client, name, uri)   # versions, aliases, run and AP, as printed
    set_alias(client, name, version, alias)
    promote(cfg, name, metric, force, split) # evaluate candidate and champion; move champion if better

Registry-only commands (list, register, alias) import neither torch nor the model: they answer
at the speed of MLflow's client. Promotion evaluates models, so it imports them.
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient

from workflows.config import JobConfig, as_dict
from workflows.registry import CANDIDATE, CHAMPION, ResolvedModel, list_versions, resolve_model


def versions_table(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Every version of `name` with its aliases, run and the run's final AP, as a table."""
    lines = [f"{'version':>7}  {'aliases':20s} {'run_id':34s} {'segm_AP':>8} {'bbox_AP':>8}"]
    for r in list_versions(client, name, tracking_uri):
        ap = [f"{r[k]:8.3f}" if r[k] is not None else f"{'-':>8}" for k in ("segm_AP", "bbox_AP")]
        lines.append(f"{r['version']:>7}  {r['aliases']:20s} {r['run_id'] or '-':34s} {ap[0]} {ap[1]}")
    return "\n".join(lines)


def set_alias(client: MlflowClient, name: str, version: str, alias: str) -> str:
    client.set_registered_model_alias(name, alias, version)
    return f"{name}@{alias} -> version {version}"


def promote(cfg: JobConfig, name: str, metric: str = "segm_AP", force: bool = False,
            split: str = "val") -> dict[str, Any]:
    """Evaluate candidate and champion on `split` in one pass of the predictor actors; move
    `champion` to the candidate if it is better (or `force`). Returns {decision, candidate,
    champion, run_id, <alias>_<metric>...}. The decision is an MLflow run (both evaluations as
    metrics) and a tag on the version."""
    from workflows.jobs.evaluate import evaluate_models, read_split
    from workflows.jobs.frame import Job
    from workflows.tracking import log_metrics

    with Job(cfg, "promote") as job:
        candidate = resolve_model(f"models:/{name}@{CANDIDATE}", job.tracking_uri, CANDIDATE)
        champion: ResolvedModel | None
        try:
            champion = resolve_model(f"models:/{name}@{CHAMPION}", job.tracking_uri, CHAMPION)
        except ValueError:
            champion = None  # the first promotion
        data = read_split(cfg, job.paths, split)
        job.start_ray()
        run_id = job.open_run(f"promote-{name}", {
            "model": name, "candidate_version": candidate.version,
            "champion_version": champion.version if champion else None, "metric": metric, "split": split,
            "force": force, "data": as_dict(cfg.data), "infer": as_dict(cfg.infer)})
        models = [candidate] + ([champion] if champion is not None else [])
        evaluations, nodes = evaluate_models(models, cfg, data, job.tracking_uri)
        scores = dict(zip((CANDIDATE, CHAMPION), evaluations))
        cand, champ = scores[CANDIDATE][metric], scores.get(CHAMPION, {}).get(metric, float("-inf"))
        client = job.client
        if champion is not None and champion.version == candidate.version:
            decision = "unchanged: candidate is already champion"
        elif force or cand > champ:
            client.set_registered_model_alias(name, CHAMPION, candidate.version)
            decision = f"promoted version {candidate.version}" + (" (forced)" if force and cand <= champ else "")
        else:
            decision = f"kept version {champion.version}: candidate {metric} {cand:.4f} <= champion {champ:.4f}"
        log_metrics(client, run_id, {f"{who}/{k}": v for who, m in scores.items() for k, v in m.items()}, 0)
        client.set_tag(run_id, "decision", decision)
        client.set_tag(run_id, "ray.predictor_nodes", ",".join(sorted(nodes)))
        client.set_model_version_tag(name, candidate.version, "promotion", decision)
        print(decision)
        return {"decision": decision, CANDIDATE: candidate.version,
                CHAMPION: champion.version if champion else None, "run_id": run_id,
                **{f"{who}_{metric}": m[metric] for who, m in scores.items()}}
