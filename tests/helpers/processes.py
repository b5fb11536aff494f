"""What the tests start, stopped by PID.

The test process is made the child subreaper of its descendants (Linux's
PR_SET_CHILD_SUBREAPER): a process whose parent exits (a Ray worker whose driver was killed, an
agent of a Ray instance whose job has ended) is re-parented to it instead of to init. So all a
test started, directly or not, is still found among this process's descendants, and nothing
else on the machine is ever looked at.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from contextlib import contextmanager
from typing import Iterator

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the subreaper of all it starts; False where the system has no such thing."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def kill(procs: list[psutil.Process], timeout: float = 20) -> None:
    """SIGKILL `procs` and wait for them (reaping those that are this process's children)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)


def tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and its descendants ([] once it has gone)."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def started_since(before: set[int]) -> list[psutil.Process]:
    """This process's descendants that are not in `before` and do not descend from one that is
    (the workers a Ray instance of the test process starts meanwhile are that instance's)."""
    me = os.getpid()
    found = []
    for p in psutil.Process(me).children(recursive=True):
        if p.pid in before:
            continue
        with contextlib.suppress(psutil.Error, ValueError):
            chain = [a.pid for a in p.parents()]
            if not set(chain[:chain.index(me)]) & before:
                found.append(p)
    return found


@contextmanager
def stopped_after() -> Iterator[None]:
    """Whatever the block starts (and what that starts) and is still running at its end is
    SIGKILLed then: the Ray instances of the jobs it ran, a head it started."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        yield
    finally:
        kill(started_since(before))
