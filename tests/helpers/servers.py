"""Real services on 127.0.0.1 for the tests: an MLflow tracking server and a Ray head."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from tests.helpers.processes import kill, stopped_after, tree

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout}s")


_TEMPLATE_STORE: list[Path] = []


def empty_mlflow_store(db: Path) -> Path:
    """An empty MLflow SQLite store at `db`, copied from one made once per test session (MLflow
    migrates a new store's schema, seconds each time here); an existing file is left alone.
    Returns `db`."""
    if not _TEMPLATE_STORE:
        import atexit

        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        atexit.register(shutil.rmtree, folder, True)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _TEMPLATE_STORE.append(folder / "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    if not db.exists():
        shutil.copyfile(_TEMPLATE_STORE[0], db)
    return db


@contextmanager
def mlflow_server(root: Path, port: int | None = None, backend: str | None = None, host: str = "127.0.0.1"):
    """`mlflow server` on `host` with a SQLite store (under `root`, or `backend`) and local
    artifacts; yields its URL. The same `root` and `port` again: the same server back after it
    went away."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    if backend is None:
        empty_mlflow_store(root / "mlflow.db")
    log = open(root / "server.log", "wb")  # noqa: SIM115 - outlives this statement, closed below
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", host, "--port", str(port),
         "--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_http(f"{url}/health", timeout=90)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


@contextmanager
def ray_head(num_cpus: int = 3):
    """`ray start --head --block` on 127.0.0.1 with the dashboard (job API); yields its
    `dashboard` URL and its GCS `address` (what `ray_address` or `ray.init` take). On exit the
    head's processes and whatever was started meanwhile (the jobs' drivers and workers) stop."""
    port, dash, agent, agent_grpc, client_port = (free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        with stopped_after(), open(Path(tmp) / "head.log", "wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                 str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus",
                 str(num_cpus),
                 # Ports of its own: a head of another test must never meet this one's agents.
                 "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                 "--ray-client-server-port", str(client_port),
                 "--disable-usage-stats", "--temp-dir", tmp], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            url = f"http://127.0.0.1:{dash}"
            try:
                wait_http(f"{url}/api/version", timeout=90)
            except Exception as e:
                raise RuntimeError(f"ray start failed:\n{(Path(tmp) / 'head.log').read_text()[-3000:]}") from e
            yield SimpleNamespace(dashboard=url, address=f"127.0.0.1:{port}")
        proc.wait()  # killed and reaped on leaving `stopped_after`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kill_job(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGKILL a job's driver, started with `start_new_session=True`, and every process it
    started, as a crash of the machine's job would. The tree is collected before the kill: a
    survivor could still write output after the test has looked at it."""
    kill(tree(proc.pid), timeout)
    proc.wait()


def ray_temp_dir(prefix: str) -> Path:
    """A new short folder for a job's own Ray instances (`RAY_TMPDIR`): Ray's socket paths must
    fit 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
