"""Timing side by side: contenders called in turns, so load from other processes on a shared machine hits
all of them alike (Table 10, and the head, trainer and prepare benchmarks)."""
from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """One timed call: wall seconds and CPU seconds (this process and its finished children)."""

    wall: float
    cpu: float


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_in_turns(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
                   sync: Callable[[], None] = lambda: None) -> dict[str, list[Timing]]:
    """Each contender's `repeats` timed calls, after `warmup` untimed rounds; every round calls each once and
    the first to run alternates per round. `sync` waits for queued device work (torch.cuda.synchronize)."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync()
    times: dict[str, list[Timing]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            cpu = cpu_seconds()  # its system calls stay outside the wall-clock window
            wall = time.perf_counter()
            contenders[name]()
            sync()
            wall = time.perf_counter() - wall
            times[name].append(Timing(wall, cpu_seconds() - cpu))
    return times


def walls(times: dict[str, list[Timing]]) -> dict[str, list[float]]:
    """The wall seconds of each contender's calls."""
    return {name: [t.wall for t in ts] for name, ts in times.items()}
