"""The frame every job (train, sweep, evaluate, promote, infer) runs inside.

    with Job(cfg, "train") as job:          # validate, job.paths derived, tracking checked, logging
        ...                                 # work that may fail before Ray: nothing is recorded
        job.start_ray()                     # start or join Ray, one way
        run_id = job.open_run("mrcnn", params, tags)   # the MLflow run, opened or resumed by name
        ...
    # on leaving: the run FINISHED, FAILED (tag `error`) or KILLED (Ctrl-C, SIGTERM), and the
    # link to it in the MLflow UI printed

Console and log file: the job's own lines (steps, evaluations, the data report, warnings that
need the user, the summary) go to the console; `output_dir/logs/JOB-TIME.log` holds what the
console showed and everything logged in the driver; Ray's routine output (Ray Train's
checkpoint and report lines, Ray Data's execution plans) stays in Ray's session logs
(`/tmp/ray/session_latest/logs`) unless `verbose=true`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from workflows.checks import validate
from workflows.config import JobConfig, Paths
from workflows.runtime.consoles import quiet_consoles
from workflows.runtime.node_paths import check_nodes_share_paths
from workflows.storage import check_writable, is_s3, join, write_bytes
from workflows.tracking import (
    check_tracking_server,
    mlflow_client,
    resolve_tracking_uri,
    run_exists,
    start_or_resume_run,
    ui_link,
)

log = logging.getLogger("workflows")


def new_run_name(prefix: str) -> str:
    """`PREFIX-YYYYmmdd-HHMMSS-xxxxxx`: readable, sorted by time, and distinct for jobs started
    in the same second (a shared name would resume the other job's run; `Job.open_run` also
    draws again should a name be taken)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class JobInterrupted(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, a scheduler's kill) raised in the job's main thread."""


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Tee:
    """A console stream whose text also goes to the job's log, colours stripped: the log holds
    what the console showed, the lines Ray forwards from the workers included."""

    def __init__(self, stream: Any, log_copy: Any):
        self.stream, self.log_copy = stream, log_copy

    def write(self, text: str) -> int:
        self.stream.write(text)
        with contextlib.suppress(ValueError, OSError):  # a closed log or a full disk: the console goes on
            self.log_copy.write(ANSI.sub("", text))
            self.log_copy.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding...: the console's
        return getattr(self.stream, name)


class Job:
    """One job's set-up and end; see the module docstring. `job.cfg` is the config as composed
    (never written to); `job.paths` its locations made absolute."""

    def __init__(self, cfg: JobConfig, kind: str):
        self.cfg, self.kind = cfg, kind
        self.paths: Paths | None = None
        self.run_id: str | None = None
        self.run_name: str | None = None
        self.tracking_uri: str | None = None
        self.log_file: Path | None = None  # local; uploaded to `log_uri` at the end when that differs
        self.log_uri: str | None = None
        self._handlers: list[logging.Handler] = []
        self._log_copy: Any = None  # the log's file, copied into from stdout and stderr
        self._consoles: tuple[Any, Any] = (None, None)
        self._levels: dict[str, int] = {}
        self._sigterm = None

    # -- entering: everything that can fail before Ray starts --------------------------------

    def __enter__(self) -> Job:
        validate(self.cfg, self.kind)
        self.paths = Paths.of(self.cfg)
        check_writable(self.paths.output_dir, "output_dir", self.cfg.data.s3)
        self._setup_logging()
        try:
            self.tracking_uri = resolve_tracking_uri(self.cfg.tracking, self.paths.output_dir)
            check_tracking_server(self.tracking_uri)
        except BaseException:
            self.__exit__(*sys.exc_info())  # the log keeps the error; the console is the console again
            raise
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        raise JobInterrupted(f"{self.kind} job stopped by SIGTERM")

    def _setup_logging(self) -> None:
        name = f"{new_run_name(self.kind)}.log"
        output_dir = self.paths.output_dir
        # In object storage the log is written locally and uploaded when the job ends.
        folder = Path(tempfile.mkdtemp(prefix="mrcnn-log-")) if is_s3(output_dir) else Path(output_dir) / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        self.log_file = folder / name
        self.log_uri = join(output_dir, f"logs/{name}")
        root = logging.getLogger()
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        to_file = logging.FileHandler(self.log_file)
        to_file.setFormatter(fmt)
        to_file.setLevel(logging.INFO)
        self._handlers = [to_file]
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in root.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            console.setLevel(logging.INFO if self.cfg.verbose else logging.WARNING)
            self._handlers.append(console)
        for h in self._handlers:
            root.addHandler(h)
        self._log_copy = open(self.log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self._consoles = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, self._log_copy), Tee(sys.stderr, self._log_copy)
        if not self.cfg.verbose:  # MLflow's own console: "Creating initial MLflow database tables..."
            quiet_consoles("mlflow")
        self._levels[""] = root.level
        root.setLevel(logging.INFO)
        log.setLevel(logging.INFO)

    # -- Ray and MLflow ---------------------------------------------------------------------

    def start_ray(self) -> None:
        """Join `ray_address`, or start a local instance. A local one runs its training workers
        at the priority of Ray's own processes (not niced: measured 1.3 -> 1.0 s a step on 2
        cores) and without Ray Train's preemption watcher (a laptop is not preempted). It keeps
        the dashboard: its State API is what Ray Train's placement-group cleaner and stopped Tune
        trials need. Then the checks that need the cluster: its size, and on more than one node,
        that every node shares the job's local paths (`workflows.node_paths`)."""
        import ray

        cfg = self.cfg
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {}
            if cfg.ray_address is None:
                os.environ.setdefault("RAY_worker_niceness", "0")
                os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
                if not cfg.verbose:
                    kwargs["runtime_env"] = {
                        "worker_process_setup_hook": "workflows.runtime.consoles.quiet_ray_process"}
            ray.init(address=cfg.ray_address, log_to_driver=True,
                     logging_level=logging.INFO if cfg.verbose else logging.WARNING, **kwargs)
            if self._sigterm is not None:  # ray.init puts its own (sys.exit) in place of the job's
                signal.signal(signal.SIGTERM, self._on_sigterm)
        if not cfg.verbose:
            quiet_consoles("ray", "ray.data", "ray.train", "ray.tune")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = self.kind == "infer"
        ctx.print_on_execution_start = cfg.verbose
        if cfg.ray_address is None:  # a cluster may add nodes; this machine will not
            validate(cfg, self.kind, cpus=ray.cluster_resources().get("CPU", 0))
        check_nodes_share_paths(cfg, self.paths, self.kind, self.tracking_uri)

    @property
    def client(self) -> MlflowClient:
        return mlflow_client(self.tracking_uri)

    def open_run(self, prefix: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                 name: str | None = None, derived: dict[str, Any] | None = None) -> str:
        """The job's MLflow run: `name` resumes the run of that name, or starts it; without
        one, a new unique name from `prefix`. `params`: the part of the composed config the job
        uses; `derived`: what the job derived, by the key it completes (the paths are added).
        Its status is set when the job ends."""
        experiment = self.cfg.tracking.experiment
        self.run_name = name or new_run_name(prefix)
        while not name and run_exists(self.client, experiment, self.run_name):
            self.run_name = new_run_name(prefix)
        self.run_id = start_or_resume_run(self.tracking_uri, experiment, self.run_name, params,
                                          tags={"job": self.kind, **(tags or {})},
                                          derived={**self.paths.labelled(), **(derived or {})})
        if self.log_uri is not None:
            self.client.set_tag(self.run_id, "log_file", self.log_uri)
        return self.run_id

    # -- leaving ----------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self.run_id is not None:
                self._end_run(exc)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
            if exc is not None and self.log_file is not None:
                log.error("%s job failed: %s", self.kind,
                          "".join(traceback.format_exception(exc_type, exc, tb))[-20000:])
            root = logging.getLogger()
            for h in self._handlers:
                root.removeHandler(h)
                h.close()
            if self._log_copy is not None:
                if isinstance(sys.stdout, Tee) and sys.stdout.log_copy is self._log_copy:
                    sys.stdout, sys.stderr = self._consoles
                self._log_copy.close()
            root.setLevel(self._levels.get("", logging.WARNING))
            self._upload_log()
        return False

    def _upload_log(self) -> None:
        if self.log_file is None or self.log_uri == str(self.log_file):
            return
        try:
            write_bytes(self.log_uri, self.log_file.read_bytes(), self.cfg.data.s3)
            shutil.rmtree(self.log_file.parent, ignore_errors=True)
        except OSError as e:
            print(f"WARNING: the job's log stays at {self.log_file}: it could not be uploaded to "
                  f"{self.log_uri} ({str(e).splitlines()[0][:300]})", file=sys.stderr)
            self.log_uri = str(self.log_file)

    def _end_run(self, exc: BaseException | None) -> None:
        # Ray turns Ctrl-C during `ray.get` into SystemExit: an interrupt too.
        status = "FINISHED" if exc is None else "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) \
            else "FAILED"
        try:
            client = self.client
            if exc is not None:
                client.set_tag(self.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            client.set_terminated(self.run_id, status=status)
            link = ui_link(self.tracking_uri, self.run_id)
        except Exception as e:  # noqa: BLE001 - the server went away: say so, keep the job's own error
            print(f"WARNING: could not mark MLflow run {self.run_id} {status} at {self.tracking_uri}: "
                  f"{str(e).splitlines()[0][:300]}", file=sys.stderr)
            return
        word = {"FINISHED": "", "FAILED": " (FAILED)", "KILLED": " (KILLED)"}[status]
        print(f"MLflow run {self.run_name}{word}; open the MLflow UI: {link}")
        if self.log_uri is not None:
            print(f"log: {self.log_uri}")

