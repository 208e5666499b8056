"""The study's schedule: list scheduling longest chain first, simulated by hand-worked cases, and the queue
that hands Ray Tune the trials (fine-tuning released when its source finishes, blocked when it fails)."""
from __future__ import annotations

import dataclasses

import pytest
from ray.tune.search import Searcher

from pipeline.config import load_params
from pipeline.study.rows import study_trials, table_rows
from pipeline.study.schedule import Job, by_priority, makespan, priorities
from pipeline.study.sweep import TrialQueue


def test_makespan_of_independent_jobs_is_worked_by_hand() -> None:
    # Two slots, longest first: t=0 a(4) b(3); t=3 c(3) to 6; t=4 d(2) to 6; t=6 e(2) to 8.
    jobs = [Job("a", 4), Job("b", 3), Job("c", 3), Job("d", 2), Job("e", 2)]
    assert makespan(jobs, slots=2) == 8
    assert makespan(jobs, slots=1) == 14
    assert makespan(jobs, slots=5) == 4
    assert makespan([], slots=3) == 0


def test_a_chain_goes_first_and_its_second_half_waits_for_the_first() -> None:
    # s(1) -> f(6) is the longest chain (7), so s starts at once beside x; at t=1 f outranks y (6 > 5):
    # t=0 s, x(5); t=1 f to 7; t=5 y to 10. Own cost first would start x and y, then s at 5, f at 6 to 12.
    jobs = [Job("x", 5), Job("y", 5), Job("s", 1), Job("f", 6, after="s")]
    assert priorities(jobs) == {"x": 5, "y": 5, "s": 7, "f": 6}
    assert by_priority(jobs) == ["s", "f", "x", "y"]
    assert makespan(jobs, slots=2) == 10
    assert makespan([Job("f", 6, after="done-already")], slots=1) == 6, "a source not scheduled is finished"
    with pytest.raises(ValueError, match="slots"):
        makespan(jobs, slots=0)


def test_queue_releases_fine_tuning_when_its_source_finishes_and_blocks_it_when_it_fails() -> None:
    params = dataclasses.replace(load_params(), seeds=(0,))  # one seed: one source per reid row
    rows = {t: table_rows(params, t) for t in ("table9", "table7")}
    trials = study_trials(rows, frozenset())
    sources = {t.after for t in trials.values() if t.after is not None}
    assert len(sources) == 2 and all(trials[s].tables == ["table9"] for s in sources)
    ranked = sorted(trials, key=lambda k: trials[k].after is None)  # dependents first: the queue must hold them
    queue = TrialQueue(trials, ranked, {k: {} for k in trials})

    handed = []
    while (config := queue.suggest(f"t{len(handed)}")) not in (None, Searcher.FINISHED):
        handed.append(config["key"])
    assert config is None, "fine-tuning trials wait for their sources"
    assert sources <= set(handed) and not any(trials[k].after for k in handed)
    good, bad = sorted(sources)
    queue.on_trial_complete(f"t{handed.index(good)}", {"finished": 1, "done": True, "top1": 50.0, "time_total_s": 3.0})
    released = queue.suggest("next")
    assert trials[released["key"]].after == good and trials[good].status == "FINISHED"
    queue.on_trial_complete(f"t{handed.index(bad)}", {"diverged": 1, "done": True})  # Tune's own `done`
    (blocked,) = [t for t in trials.values() if t.after == bad]
    assert blocked.status == "BLOCKED" and bad in blocked.reason and trials[bad].status == "FAILED"
    assert queue.suggest("last") == Searcher.FINISHED
