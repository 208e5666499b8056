"""The study's schedule: which trial goes next, and how long the whole takes on K GPUs.

One rule serves the real run and `plan`'s estimate: list scheduling, longest chain first. A trial's
priority is its own cost plus the costliest chain of trials waiting on it (a classification trial that
re-identification fine-tuning starts from carries the fine-tuning's cost too), so the chains that decide
the end of the study start first and the short trials fill the gaps. `makespan` simulates that rule: a
free slot takes the ready trial of highest priority; a trial is ready once the trial it starts from has
finished (or when it starts from nothing).
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One trial to schedule: its identity, its cost (any unit, e.g. GPU-hours) and the identity of the
    trial it starts from, if that one is also to be scheduled."""

    key: str
    cost: float
    after: str | None = None


def priorities(jobs: Iterable[Job]) -> dict[str, float]:
    """Each job's cost plus the costliest chain of jobs that wait on it (its 'bottom level')."""
    jobs = {j.key: j for j in jobs}
    waiting: dict[str, list[str]] = {}
    for job in jobs.values():
        if job.after in jobs:
            waiting.setdefault(job.after, []).append(job.key)
    out: dict[str, float] = {}

    def level(key: str) -> float:
        if key not in out:
            out[key] = jobs[key].cost + max((level(k) for k in waiting.get(key, [])), default=0.0)
        return out[key]

    for key in jobs:
        level(key)
    return out


def by_priority(jobs: Iterable[Job]) -> list[str]:
    """The keys by priority, highest first (ties by key, so the order is stable)."""
    prio = priorities(jobs)
    return sorted(prio, key=lambda k: (-prio[k], k))


def makespan(jobs: Iterable[Job], slots: int) -> float:
    """The time `slots` parallel slots take to run every job under the list-scheduling rule; a job's
    duration is its cost (divide costs by the devices a job uses before calling)."""
    if slots < 1:
        raise ValueError(f"slots: got {slots}; allowed: an integer >= 1")
    jobs = {j.key: j for j in jobs}
    ranked = by_priority(jobs.values())
    done: set[str] = set()
    running: list[tuple[float, str]] = []  # (end, key), a heap
    pending = list(ranked)
    now = end = 0.0
    while pending or running:
        ready = [k for k in pending if jobs[k].after not in jobs or jobs[k].after in done]
        for key in ready[:slots - len(running)]:
            pending.remove(key)
            heapq.heappush(running, (now + jobs[key].cost, key))
        now, key = heapq.heappop(running)
        done.add(key)
        end = max(end, now)
    return end

