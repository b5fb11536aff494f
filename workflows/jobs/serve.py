"""`mrcnn-serve`: a registered model online on Ray Serve (`workflows.serving.app`), in the
foreground like `mlflow models serve`.

    resolve the model, read the token -> start or join Ray -> the MLflow run -> Serve's proxy on
    serve.host:serve.port and the application deployed -> the URL printed once /healthz answers
    -> every serve.log_every_s: request counts, latency percentiles, batch sizes and the version
    served logged to the run -> Ctrl-C or SIGTERM: the application deleted, the run FINISHED

On a cluster, `ray job submit --no-wait -- mrcnn-serve ray_address=auto serve.host=0.0.0.0`
returns at once and leaves it running as a Ray job; `ray job stop ID` takes it down and ends the
run. A failure before the endpoint answers stops the job with its error (the run FAILED).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from workflows.config import JobConfig, ServeConfig, as_dict
from workflows.jobs.frame import Job
from workflows.tracking import log_metrics

READY_TIMEOUT_S = 300.0
log = logging.getLogger(__name__)


def url_of(s: ServeConfig, host: str | None = None) -> str:
    host = host or s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def check_port_free(s: ServeConfig) -> None:
    """A local Ray's proxy would fail to bind a port in use and Serve keep retrying: say so now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds: TIME_WAIT is no use
        try:
            sock.bind((s.host, s.port))
        except OSError as e:
            raise ValueError(f"serve.port={s.port} on serve.host={s.host} cannot be bound ({e.strerror}): "
                             f"choose another port, e.g. serve.port={s.port + 1}") from None


def wait_until_answering(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout:.0f} s of the deployment")
        time.sleep(0.25)


def stats_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The follower's stats -> the run's `serve/` metrics."""
    out = {f"serve/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    version = stats["versions"][-1] if stats.get("versions") else None
    if version and str(version).isdigit():
        out["serve/model_version"] = float(version)
    return out


def log_stats(follower: Any, client: Any, run_id: str, step: int, timeout_s: float = 30) -> dict[str, Any] | None:
    """The follower's counts logged to the run; None when it cannot answer now (restarting on
    another node after its own was lost): the serving goes on."""
    try:
        stats = follower.stats.remote().result(timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - Serve's errors for an actor being replaced
        log.warning("no request counts this time: %s", str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        return None
    log_metrics(client, run_id, stats_metrics(stats), step)
    return stats


def run(cfg: JobConfig) -> dict[str, Any]:
    from ray import serve

    from workflows.serving.app import application, deployed_of

    with Job(cfg, "serve") as job:
        s = cfg.serve
        deployed = deployed_of(s, job.tracking_uri)
        local = cfg.ray_address is None and not os.environ.get("RAY_ADDRESS")  # not under `ray job submit`
        if local:
            check_port_free(s)
            if not cfg.verbose:  # Serve's request lines stay in its logs (/tmp/ray/session_latest/logs/serve)
                os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        job.start_ray()
        model = deployed.model
        url = url_of(s)
        run_id = job.open_run("serve", {"serve": as_dict(s)},
                              tags={"url": url, **({"model_version": model.version} if model.version else {})},
                              derived={"serve.model": model.uri})
        client = job.client
        serve.start(http_options={"host": s.host, "port": s.port})
        stats: dict[str, Any] = {}
        try:
            serve.run(application(deployed), name=s.name, route_prefix=s.route_prefix, blocking=False)
            # A proxy bound to every address answers on this machine's loopback.
            wait_until_answering(url_of(s, "127.0.0.1" if s.host in ("0.0.0.0", "::") else None), READY_TIMEOUT_S)
            follower = serve.get_deployment_handle("ModelFollower", app_name=s.name)
            print(f"serving {model.given} ({model.uri}) at {url}: POST {url}/segment, POST {url}/invocations, "
                  f"GET {url}/version; Ctrl-C stops it", flush=True)
            step = 0
            try:
                while True:
                    time.sleep(s.log_every_s)
                    step += 1
                    stats = log_stats(follower, client, run_id, step) or stats
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a server's normal end
                print(f"stopping {s.name}", flush=True)
            # Quickly: `ray job stop` kills the job 3 s after its SIGTERM.
            stats = log_stats(follower, client, run_id, step + 1, timeout_s=1) or stats
            client.set_tag(run_id, "served_versions", json.dumps(stats.get("versions", [])))
        finally:
            if local:  # this job's Ray: all of Serve goes with it
                serve.shutdown()
            else:  # a cluster's: this application, without waiting (`ray job stop` kills 3 s after SIGTERM)
                serve.delete(s.name, _blocking=False)
        print(f"{stats.get('requests', 0)} requests; latency p50 {stats.get('latency_p50_ms', 0):.0f} ms, "
              f"p99 {stats.get('latency_p99_ms', 0):.0f} ms; versions served: {', '.join(stats.get('versions', []))}")
        return {"run_id": run_id, "tracking_uri": job.tracking_uri, "url": url, "stats": stats}
