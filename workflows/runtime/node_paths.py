"""On a cluster of more than one node, before any work: every local path a job uses must be the
same folder on every node (a shared mount), or the job stops naming the key and what to set.

Checked, not guessed: the driver writes a token into each folder the job writes to and every
node reads it back and writes its own, which the driver reads; a folder the job only reads
(`data.root`, `infer.input`) must list the same entries on every node. Paths in object storage
(s3://) and tracking servers need no check.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from workflows.config import JobConfig, Paths
from workflows.registry import ModelURI
from workflows.storage import is_s3
from workflows.tracking import sqlite_path

WHAT_TO_SET = {
    "output_dir": "an object-store URI (output_dir=s3://bucket/prefix) or a folder every node mounts",
    "data.root": "a dataset in object storage (data.root=s3://bucket/prefix) or on a mount every node shares",
    "tracking.tracking_uri": "an MLflow server every node reaches (tracking.tracking_uri=http://host:5000)",
    "infer.input": "an s3:// prefix or a folder every node mounts",
    "infer.output": "an s3:// prefix or a folder every node mounts",
}
MODEL_FILE = "a registered model (models:/NAME@ALIAS), an s3:// URI or a file on a mount every node shares"
WHAT_TO_SET.update({"trainer.init_weights": MODEL_FILE, "infer.model": MODEL_FILE})


def local_paths(cfg: JobConfig, paths: Paths, kind: str, tracking_uri: str | None) -> dict[str, tuple[str, str, bool]]:
    """{key: (value as the user gave it, local folder, written)} of the job's local paths."""
    found: dict[str, tuple[str, str, bool]] = {}
    if not is_s3(paths.output_dir):
        found["output_dir"] = (cfg.output_dir, paths.output_dir, True)
    if kind in ("train", "sweep", "evaluate", "promote") and not is_s3(paths.data_root):
        found["data.root"] = (cfg.data.root, paths.data_root, False)
    db = sqlite_path(tracking_uri) if tracking_uri else None
    if db is not None:
        found["tracking.tracking_uri"] = (tracking_uri, str(db.parent), True)
    # Model files the workers and predictors read: their folder must be the same on every node.
    models = {"trainer.init_weights": cfg.trainer.init_weights if kind in ("train", "sweep") else None,
              "infer.model": cfg.infer.model if kind == "infer" else None}
    for key, value in models.items():
        if value and ModelURI.parse(value).kind == "file" and not is_s3(value):
            found[key] = (value, str(Path(value).resolve().parent), False)
    if kind == "infer":
        for key, value, written in (("input", paths.infer_input, False), ("output", paths.infer_output, True)):
            if value and not is_s3(value):
                folder = value if written or Path(value).is_dir() else str(Path(value).parent)  # a manifest's folder
                found[f"infer.{key}"] = (getattr(cfg.infer, key), folder, written)
    return found


def _entries(folder: str) -> list[str]:
    try:  # without the probes of this check (a folder may be read and written)
        return sorted(e for e in os.listdir(folder) if not e.startswith(".node-check-"))
    except OSError:
        return []


def _look(checks: list[tuple[str, str, str]], node: str) -> list[str]:
    """On one node: the keys whose folder is not the driver's. checks: (key, folder, token or
    the driver's listing joined)."""
    wrong = []
    for key, folder, expect in checks:
        if expect.startswith("token:"):
            probe = Path(folder) / f".node-check-{expect[len('token:'):]}"
            try:
                seen = probe.read_text() == expect
                (Path(folder) / f"{probe.name}-{node}").write_text(expect)
            except OSError:
                seen = False
        else:
            seen = "\n".join(_entries(folder)) == expect
        if not seen:
            wrong.append(key)
    return wrong


def check_nodes_share_paths(cfg: JobConfig, paths: Paths, kind: str, tracking_uri: str | None) -> None:
    """Raise ValueError naming each local path some node of the (multi-node) cluster does not
    share with this driver, and what to set instead."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    found = local_paths(cfg, paths, kind, tracking_uri)
    if len(nodes) < 2 or not found:
        return
    token = secrets.token_hex(8)
    checks = []
    for key, (_, folder, written) in found.items():
        if written:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f".node-check-{token}").write_text(f"token:{token}")
            checks.append((key, folder, f"token:{token}"))
        else:
            checks.append((key, folder, "\n".join(_entries(folder))))
    look = ray.remote(num_cpus=0)(_look)
    try:
        answers = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(checks, n["NodeID"]) for n in nodes])
        problems: dict[str, list[str]] = {}
        for node, wrong in zip(nodes, answers):
            for key in wrong:
                problems.setdefault(key, []).append(node["NodeManagerAddress"])
            for key, folder, expect in checks:  # what the node wrote must be here too
                back = Path(folder) / f".node-check-{token}-{node['NodeID']}"
                if key not in wrong and expect.startswith("token:") and not back.is_file():
                    problems.setdefault(key, []).append(node["NodeManagerAddress"])
    finally:
        for _, folder, expect in checks:
            if expect.startswith("token:"):
                for probe in Path(folder).glob(f".node-check-{token}*"):
                    probe.unlink(missing_ok=True)
    if problems:
        lines = [f"{key}={found[key][0]} is a local path that node(s) {', '.join(sorted(set(where)))} do not share "
                 f"with this driver: set {WHAT_TO_SET[key]}" for key, where in problems.items()]
        raise ValueError(f"this job runs on a cluster of {len(nodes)} nodes:\n  " + "\n  ".join(lines))
