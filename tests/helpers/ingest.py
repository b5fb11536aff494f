"""Counting a Ray Data split's scheduling steps from inside its coordinator process: a named
actor tallies what an execution callback reports, so a test measures the loop itself (steps a
second) instead of the CPU time it took, which depends on what else the machine runs."""

from __future__ import annotations

import ray

from workflows.runtime.ray_internals import ExecutionCallback

TALLY = "ingest-step-tally"


@ray.remote(num_cpus=0)
class StepTally:
    def __init__(self) -> None:
        self.steps = 0

    def add(self, n: int) -> None:
        self.steps += n

    def total(self) -> int:
        return self.steps


class StepCounter(ExecutionCallback):
    """Reports every 10 scheduling steps of the executor it is attached to to the TALLY actor."""

    EVERY = 10

    def __init__(self) -> None:
        self.n, self.tally = 0, None

    def on_execution_step(self, executor) -> None:
        self.n += 1
        if self.n % self.EVERY == 0:
            self.tally = self.tally or ray.get_actor(TALLY)
            self.tally.add.remote(self.EVERY)
