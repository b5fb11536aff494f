"""Resident memory of this process and every process it started (Ray's included), sampled per
process and kind."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil


def status_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of a process in KiB (/proc/PID/status). RssShmem counts the
    pages of Ray's object store (a shared mapping) that the process has touched."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def process_kind(p: psutil.Process, driver: int) -> str:
    """driver | predictor (the inference actors) | ray worker (tasks: decode, write; idle
    workers) | ray system (raylet, GCS, dashboard, monitors)."""
    if p.pid == driver:
        return "driver"
    cmd = " ".join(p.cmdline())
    if "Predictor" in cmd:
        return "predictor"
    return "ray worker" if cmd.startswith("ray::") else "ray system"


class ProcessMemory:
    """Every `interval` s: `progress()` (e.g. images done) and each process's RssAnon / RssShmem
    (KiB), this process and its descendants, with its kind. `samples`: [(t, progress,
    {pid: (kind, anon, shmem)})]."""

    def __init__(self, progress, interval: float = 1.0):
        self.progress, self.interval, self.samples, self._stop = progress, interval, [], threading.Event()

    def sample(self) -> None:
        me = psutil.Process()
        procs = {}
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, OSError):  # a process may end meanwhile
                s = status_kib(p.pid)
                procs[p.pid] = (process_kind(p, me.pid), s["RssAnon"], s["RssShmem"])
        self.samples.append((time.time(), self.progress(), procs))

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def series(self, kind: str, field: str = "rss") -> list[tuple[int, float]]:
        """[(progress, MiB)] of one kind: the per-process mean of `field` ("anon", "shmem" or
        "rss", their sum) over the processes of that kind alive at each sample."""
        wa, ws = {"anon": (1, 0), "shmem": (0, 1), "rss": (1, 1)}[field]
        out = []
        for _, done, procs in self.samples:
            values = [wa * a + ws * s for k, a, s in procs.values() if k == kind]
            if values:
                out.append((done, sum(values) / len(values) / 1024))
        return out


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of MiB against progress, per 1,000 (nan with under two distinct
    progress values)."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx
