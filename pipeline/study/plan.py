"""`python -m pipeline plan`: what a profile's study costs, and how long it takes on K GPUs, before it runs.

Per table: printed rows, trials (Table 9 trains each row twice), unique trials, those new to the study
(not already counted in an earlier table), those already FINISHED in MLflow, the estimated GPU-hours of
its unfinished new trials (`study.cost`), and `makespan_hours`: that table alone on `--gpus` K GPUs, each
trial on `--gpus-per-trial` G of them (assumed to scale linearly), scheduled as the study schedules
(`study.schedule`). `total.makespan_hours` is the whole study scheduled at once; `total.table_by_table_hours`
is the same trials run one table after another, each table waiting for the one before.
The tables are those the profile trains (`Params.tables_of`): `--profile proxy` prices the one-GPU proxy study alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

from ..config import PARAMS, ConfigError, Params, load_params
from ..models import list_backbones
from ..training.trial import trial_key
from .cost import read_measured, trial_hours
from .rows import RowTrials, study_trials, table_order, table_rows
from .schedule import Job, makespan

BENCHMARK_TABLE = "table10"  # the speed benchmark: model pairs, no training


def plan(params: Params, gpus: float = 1, gpus_per_trial: float = 1) -> dict[str, Any]:
    """Counts, GPU-hours and makespans per table and in total; no configuration is counted twice in the total."""
    if gpus_per_trial <= 0:
        raise ConfigError("--gpus-per-trial", gpus_per_trial, "a positive number (a fraction shares a GPU)")
    if gpus < gpus_per_trial:
        raise ConfigError("--gpus", gpus, f"at least --gpus-per-trial ({gpus_per_trial:g})")
    measured = read_measured(params.mlflow.tracking_uri)
    slots = math.floor(gpus / gpus_per_trial + 1e-9)
    rows = {name: table_rows(params, name) for name in sorted(params.tables_of(), key=table_order)}
    cost = {k: trial_hours(st.trial, measured, params.datasets, params.active.gpu_tflops)
            for k, st in study_trials(rows, frozenset()).items()}
    wall = {k: None if c is None else c / gpus_per_trial for k, c in cost.items()}

    def span(tables: dict[str, list[RowTrials]], done: frozenset[str]) -> float | None:
        """The makespan of the trials `tables` need that are not `done` (None when a cost is unknown)."""
        todo = [st for st in study_trials(tables, done).values() if st.status == "PENDING"]
        if any(wall[st.key] is None for st in todo):
            return None
        return round(makespan([Job(st.key, wall[st.key], st.after) for st in todo], slots), 4)

    seen: frozenset[str] = frozenset()
    keys: dict[str, set[str]] = {}
    out: dict[str, Any] = {}
    sequential: list[float | None] = []
    for name, table in rows.items():
        keys[name] = {trial_key(t) for rt in table for t in rt.trials.values()}
        new = keys[name] - seen
        hours = [cost[k] for k in new if k not in measured.finished]
        out[name] = {"rows": len(table), "trials": sum(len(rt.trials) for rt in table),
                     "unique_trials": len(keys[name]), "new_unique_trials": len(new),
                     "finished": len(keys[name] & measured.finished),
                     "gpu_hours": None if None in hours else round(sum(hours), 4),
                     "makespan_hours": span({name: table}, measured.finished)}
        sequential.append(span({name: table}, measured.finished | seen))
        seen |= study_trials({name: table}, frozenset()).keys()  # with the sources its fine-tuning needs
    if params.active.tables is None:  # a profile of its own tables (the proxy) runs no benchmark
        out[BENCHMARK_TABLE] = {"rows": len(list_backbones()), "trials": 0, "unique_trials": 0, "new_unique_trials": 0,
                                "finished": 0, "gpu_hours": 0.0, "makespan_hours": 0.0}
    hours = [t["gpu_hours"] for t in out.values()]
    unique = set().union(*keys.values())
    total = {"rows": sum(t["rows"] for t in out.values()), "trials": sum(t["trials"] for t in out.values()),
             "unique_trials": len(unique), "finished": len(unique & measured.finished),
             "gpu_hours": None if None in hours else round(sum(hours), 4),
             "makespan_hours": span(rows, measured.finished),
             "table_by_table_hours": None if None in sequential else round(sum(sequential), 4)}
    return {"profile": params.profile, "gpus": gpus, "gpus_per_trial": gpus_per_trial,
            "tables": {t: out[t] for t in sorted(out, key=table_order)}, "total": total}


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params or PARAMS)
    if args.profile:
        if args.profile not in params.profiles:
            raise ConfigError("--profile", args.profile, "a key of `profiles`: " + ", ".join(params.profiles))
        params = dataclasses.replace(params, profile=args.profile)
    result = plan(params, args.gpus, args.gpus_per_trial)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"profile {result['profile']}: {result['gpus']:g} GPUs, {result['gpus_per_trial']:g} per trial")
    print(f"{'table':<9}{'rows':>6}{'trials':>8}{'unique':>8}{'new':>6}{'finished':>10}{'GPU-h':>10}{'makespan-h':>12}")
    for name, t in [*result["tables"].items(), ("total", {**result["total"], "new_unique_trials": ""})]:
        hours, span = ("?" if v is None else f"{v:.3g}" for v in (t["gpu_hours"], t["makespan_hours"]))
        print(f"{name:<9}{t['rows']:>6}{t['trials']:>8}{t['unique_trials']:>8}{t['new_unique_trials']:>6}"
              f"{t['finished']:>10}{hours:>10}{span:>12}")
    if result["total"]["table_by_table_hours"] is not None:
        print(f"one table after another: {result['total']['table_by_table_hours']:.3g} h")
    return 0
