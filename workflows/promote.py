"""The promotion job: evaluate the registry's `candidate` and `champion` on the same split and
move `champion` to the candidate when it scores higher (`mrcnn-models promote`)."""

from __future__ import annotations

from typing import Any

from workflows.evaluate import evaluate_model
from workflows.job import Job
from workflows.registry import CANDIDATE, CHAMPION, check_model, load_model
from workflows.tracking import log_metrics


def run(cfg: dict[str, Any], name: str, metric: str = "segm_AP", force: bool = False,
        split: str = "val") -> dict[str, Any]:
    """Evaluate candidate and champion on `split`; move `champion` to the candidate if it is
    better (or `force`). Returns {decision, candidate, champion, run_id, <alias>_<metric>...}.
    The decision is an MLflow run (both evaluations as metrics) and a tag on the version."""
    with Job(cfg, "promote") as job:
        candidate_uri, champion_uri = f"models:/{name}@{CANDIDATE}", f"models:/{name}@{CHAMPION}"
        check_model(candidate_uri, job.tracking_uri, CANDIDATE)
        try:
            check_model(champion_uri, job.tracking_uri, CHAMPION)
            has_champion = True
        except ValueError:
            has_champion = False  # the first promotion
        job.start_ray()
        candidate = load_model(candidate_uri, job.tracking_uri)
        champion = load_model(champion_uri, job.tracking_uri) if has_champion else None
        run_id = job.open_run(f"promote-{name}", {
            "model": name, "candidate_version": candidate.version,
            "champion_version": champion.version if champion else None, "metric": metric, "split": split,
            "force": force, "data": job.cfg["data"]})
        scores = {CANDIDATE: evaluate_model(candidate, job.cfg, split)}
        if champion is not None:
            scores[CHAMPION] = evaluate_model(champion, job.cfg, split)
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
        client.set_model_version_tag(name, candidate.version, "promotion", decision)
        print(decision)
        return {"decision": decision, CANDIDATE: candidate.version,
                CHAMPION: champion.version if champion else None, "run_id": run_id,
                **{f"{who}_{metric}": m[metric] for who, m in scores.items()}}
