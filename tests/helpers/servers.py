"""Real services on 127.0.0.1 for the tests: an MLflow tracking server and a Ray head."""

from __future__ import annotations

import contextlib
import os
import re
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
    """`ray start --head` on 127.0.0.1 with the dashboard (job API); yields its `dashboard` URL
    and its GCS `address` (what `ray_address` or `ray.init` take)."""
    port, dash, agent, agent_grpc, client_port = (free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
         # Ports of its own: a head of another test must never meet this one's agents.
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--ray-client-server-port", str(client_port),
         "--disable-usage-stats", "--temp-dir", tmp], env=env, capture_output=True, text=True)
    if started.returncode:
        raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{url}/api/version", timeout=90)
        yield SimpleNamespace(dashboard=url, address=f"127.0.0.1:{port}")
    finally:
        # This head's processes only, not every Ray on the machine.
        kill_processes_mentioning(tmp, str(port), str(client_port))
        shutil.rmtree(tmp, ignore_errors=True)


def kill_job(proc: subprocess.Popen, temp: str, timeout: float = 20) -> None:
    """SIGKILL a job's driver, started with `start_new_session=True`, and every Ray process it
    started, as a crash of the machine's job would. Ray workers rename their command lines
    (`ray::Predictor`), so they are found as the driver's descendants, collected before the kill:
    a survivor could still write output after the test has looked at it."""
    import psutil

    tree = []
    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, 9)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=timeout)
    kill_processes_mentioning(temp, timeout=timeout)


def ray_temp_dir(prefix: str) -> Path:
    """A new short folder for a job's own Ray instances (`RAY_TMPDIR`): Ray's socket paths must
    fit 107 bytes. `remove_ray_temp_dir` ends what ran there."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_ray_temp_dir(temp: Path) -> None:
    """Kill the processes of the Ray instances that ran in `temp`, and remove it."""
    kill_processes_mentioning(str(temp))
    shutil.rmtree(temp, ignore_errors=True)


def _mentions(arg: str, text: str) -> bool:
    """`arg` names `text` exactly: the path itself or a path under it (`/tmp/rk12` does not name
    `/tmp/rk123`), alone or after `=` (`--temp-dir=/tmp/rk12`), or a port at the end of an
    address or option (`:6379`, `=6379`, not `:63790`)."""
    if text.isdigit():
        return re.search(rf"(^|[:=]){text}$", arg) is not None
    return re.search(rf"(^|=){re.escape(text)}(/|$)", arg) is not None


def kill_processes_mentioning(*texts: str, timeout: float = 20) -> int:
    """SIGKILL every process one of whose arguments names one of `texts` exactly (a test's own
    temp folder, its head's ports; see `_mentions`), and their descendants: Ray's agents rename
    their command lines (`ray::DashboardAgent`) and would hold their ports for the next test.
    Returns how many."""
    import psutil

    me = os.getpid()
    victims = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != me and any(_mentions(part, t) for t in texts for part in (p.info["cmdline"] or [])):
            victims[p.pid] = p
            with contextlib.suppress(psutil.Error):
                victims.update({c.pid: c for c in p.children(recursive=True)})
    for p in victims.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(victims.values()), timeout=timeout)
    return len(victims)
