"""Timing side by side: contenders called in turns, so load from other processes on a shared machine hits
all of them alike (Table 10, and the head, trainer and prepare benchmarks)."""
from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """One timed call: wall seconds and CPU seconds (this process and its finished children)."""

    wall: float
    cpu: float


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rounds_in_turns(contenders: dict[str, Callable[[], object]], warmup: int = 0,
                    sync: Callable[[], None] = lambda: None) -> Iterator[dict[str, Timing]]:
    """Endless rounds, each calling every contender once and yielding their timings, after `warmup` untimed
    rounds; the first to run alternates per round. The caller decides when enough rounds are in (Table 10
    stops once its interval is narrow enough). `sync` waits for queued device work (torch.cuda.synchronize)."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync()
    for rep in itertools.count():
        timings = {}
        for name in names if rep % 2 == 0 else names[::-1]:
            cpu = cpu_seconds()  # its system calls stay outside the wall-clock window
            wall = time.perf_counter()
            contenders[name]()
            sync()
            wall = time.perf_counter() - wall
            timings[name] = Timing(wall, cpu_seconds() - cpu)
        yield timings


def timed_in_turns(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
                   sync: Callable[[], None] = lambda: None) -> dict[str, list[Timing]]:
    """Each contender's `repeats` timed calls from `rounds_in_turns`."""
    rounds = list(itertools.islice(rounds_in_turns(contenders, warmup, sync), repeats))
    return {name: [r[name] for r in rounds] for name in contenders}


def walls(times: dict[str, list[Timing]]) -> dict[str, list[float]]:
    """The wall seconds of each contender's calls."""
    return {name: [t.wall for t in ts] for name, ts in times.items()}
