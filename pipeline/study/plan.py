"""`python -m pipeline plan`: what a profile's study costs before it runs.

Per table: printed rows, trials (Table 9 trains each row twice), unique trials, those new to the study
(not already counted in an earlier table), those already FINISHED in MLflow, and the estimated compute
of the unfinished new ones in GPU-hours: epochs × training images ÷ throughput, the throughput taken
from the model's MAdds at the profile's image size and `gpu_tflops` (forward + backward ≈ 3 forwards).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from ..config import PARAMS, ConfigError, Params, load_params
from ..data.prepared import train_images
from ..models import list_backbones
from ..models.complexity import measure
from ..training.tracking import TRIAL_TAG, client, local_store
from ..training.trial import Trial, trial_key
from .tables import table_rows

BENCHMARK_TABLE = "table10"  # the speed benchmark: model pairs, no training


def _finished_ids(params: Params) -> set[str]:
    """Trial identities with a FINISHED MLflow run; an absent SQLite store means none (and stays absent)."""
    local = local_store(params.mlflow.tracking_uri)
    if local is not None and not local.exists():
        return set()
    mlflow_client = client(params.mlflow.tracking_uri)
    ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    runs = mlflow_client.search_runs(ids, filter_string="attributes.status = 'FINISHED'") if ids else []
    return {r.data.tags[TRIAL_TAG] for r in runs if TRIAL_TAG in r.data.tags}


def _train_images(params: Params, trial: Trial) -> int | None:
    """Training images of the trial's data: as prepared, else what its `datasets:` entry expects."""
    prepared = train_images(trial.data_dir)
    if prepared is not None:
        return prepared
    name = next(n for n, d in params.datasets.items() if str(Path(trial.data_dir)).endswith(d.out))
    return params.datasets[name].train_images


@functools.cache
def _measure(backbone: str, head: Any, img_size: int) -> tuple[int, int]:
    return measure(backbone, head, img_size=img_size)


def gpu_hours(params: Params, trial: Trial) -> float | None:
    """Estimated GPU-hours of one trial (None when the training set size is unknown)."""
    images = _train_images(params, trial)
    if images is None:
        return None
    _, madds = _measure(trial.backbone, trial.head, trial.img_size)
    images_per_s = params.active.gpu_tflops * 1e12 / (3 * 2 * madds)
    return trial.epochs * images / images_per_s / 3600


def _table_order(name: str) -> tuple[int, int, str]:
    """The paper's order (`table4` before `table10`), then tables of other names alphabetically."""
    number = name.removeprefix("table")
    return (0, int(number), "") if number.isdigit() else (1, 0, name)


def plan(params: Params) -> dict[str, Any]:
    """Counts and estimates per table and in total; no configuration is counted twice in the total."""
    finished = _finished_ids(params)
    seen: set[str] = set()
    tables: dict[str, Any] = {}
    for name in params.tables:
        rows = table_rows(params, name)
        trials = {trial_key(t): t for rt in rows for t in rt.trials.values()}
        new = {k: t for k, t in trials.items() if k not in seen}
        todo = [t for k, t in new.items() if k not in finished]
        hours = [gpu_hours(params, t) for t in todo]
        tables[name] = {"rows": len(rows), "trials": sum(len(rt.trials) for rt in rows),
                        "unique_trials": len(trials), "new_unique_trials": len(new),
                        "finished": sum(k in finished for k in trials),
                        "gpu_hours": None if None in hours else round(sum(hours), 2)}
        seen |= trials.keys()
    tables[BENCHMARK_TABLE] = {"rows": len(list_backbones()), "trials": 0, "unique_trials": 0,
                               "new_unique_trials": 0, "finished": 0, "gpu_hours": 0.0}
    hours = [t["gpu_hours"] for t in tables.values()]
    total = {"rows": sum(t["rows"] for t in tables.values()), "trials": sum(t["trials"] for t in tables.values()),
             "unique_trials": len(seen), "finished": len(seen & finished),
             "gpu_hours": None if None in hours else round(sum(hours), 2)}
    order = sorted(tables, key=_table_order)
    return {"profile": params.profile, "tables": {t: tables[t] for t in order}, "total": total}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help="a key of params.yaml `profiles` (default: its `profile`)")
    parser.add_argument("--params", default=None, help="the params file (default: the repository's params.yaml)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params or PARAMS)
    if args.profile:
        if args.profile not in params.profiles:
            raise ConfigError("--profile", args.profile, "a key of `profiles`: " + ", ".join(params.profiles))
        params = dataclasses.replace(params, profile=args.profile)
    result = plan(params)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"profile {result['profile']}")
    print(f"{'table':<9}{'rows':>6}{'trials':>8}{'unique':>8}{'new':>6}{'finished':>10}{'GPU-h':>10}")
    for name, t in [*result["tables"].items(), ("total", {**result["total"], "new_unique_trials": ""})]:
        hours = "?" if t["gpu_hours"] is None else f"{t['gpu_hours']:.1f}"
        print(f"{name:<9}{t['rows']:>6}{t['trials']:>8}{t['unique_trials']:>8}{t['new_unique_trials']:>6}"
              f"{t['finished']:>10}{hours:>10}")
    return 0
