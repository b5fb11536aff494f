"""Resident memory of this process and every process it started (Ray's included), sampled."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil


class PeakMemory:
    """Samples the summed RSS of this process and its descendants every `interval` seconds:
    `peak` (bytes) and `samples` [(time, bytes)]."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.samples, self._stop = interval, 0, [], threading.Event()

    @staticmethod
    def total() -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for p in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a process may end meanwhile
                total += p.memory_info().rss
        return total

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.total()
            self.samples.append((time.time(), rss))
            self.peak = max(self.peak, rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
