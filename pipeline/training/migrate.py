"""`python -m pipeline migrate-tracking`: copy a study's MLflow store (e.g. the embedded `mlflow.db`) onto a
tracking server, so a study pointed at the server finds every FINISHED trial there and trains none again.

MLflow has no store-to-store copy (`mlflow migrate-filestore` only turns a file store into SQLite): this copies
each active experiment by name and each active run in it (params, every metric's whole history, tags, status,
times, artifacts), parents before their children so `mlflow.parentRunId` points at the copy. A copied run is
tagged `migrated_from` with its source id, so running the command again copies only what is new."""
from __future__ import annotations

import argparse
import sys
import tempfile

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, Run, ViewType

from ..config import ConfigError
from .tracking import MAX_BATCH, check_store, client, experiment_id, local_store, resolve_uri

MIGRATED_TAG = "migrated_from"
PARENT_TAG = "mlflow.parentRunId"
MAX_METRICS = 1000  # MLflow's limit on metrics per log_batch call


def migrate(source: str, target: str) -> dict[str, int]:
    """Copy every active experiment and run of `source` into `target`; returns how many runs were copied and
    how many were there already."""
    src, dst = client(source), client(target)
    counts = {"copied": 0, "present": 0}
    for exp in src.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        runs = src.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=50000)
        if not runs:
            continue
        target_exp = experiment_id(dst, exp.name)
        held = {r.data.tags[MIGRATED_TAG]: r.info.run_id for r in dst.search_runs(
            [target_exp], f"tags.{MIGRATED_TAG} != ''", run_view_type=ViewType.ALL, max_results=50000)}
        counts["present"] += sum(r.info.run_id in held for r in runs)
        for run in sorted(runs, key=lambda r: PARENT_TAG in r.data.tags):  # parents first
            if run.info.run_id not in held:
                held[run.info.run_id] = _copy_run(src, dst, run, target_exp, held)
                counts["copied"] += 1
    return counts


def _copy_run(src: MlflowClient, dst: MlflowClient, run: Run, exp_id: str, copies: dict[str, str]) -> str:
    """Copy one run into experiment `exp_id`; its parent (if any) is already among `copies`."""
    tags = dict(run.data.tags) | {MIGRATED_TAG: run.info.run_id}
    if PARENT_TAG in tags:
        tags[PARENT_TAG] = copies.get(tags[PARENT_TAG], tags[PARENT_TAG])
    new = dst.create_run(exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name).info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), MAX_BATCH):
        dst.log_batch(new, params=params[i:i + MAX_BATCH])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics
               for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), MAX_METRICS):
        dst.log_batch(new, metrics=metrics[i:i + MAX_METRICS])
    if src.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory() as tmp:
            dst.log_artifacts(new, download_artifacts(run_id=run.info.run_id, dst_path=tmp,
                                                      tracking_uri=src.tracking_uri))
    if run.info.status != "RUNNING":
        dst.set_terminated(new, run.info.status, end_time=run.info.end_time)
    return new


def run(args: argparse.Namespace) -> int:
    source, target = resolve_uri(args.source), resolve_uri(args.target)
    store = local_store(source)
    if store is not None and not store.exists():
        raise ConfigError("--from", args.source, "an existing MLflow store")
    check_store(target, "--to")
    counts = migrate(source, target)
    print(f"migrate-tracking: {counts['copied']} runs copied, {counts['present']} copied before", file=sys.stderr)
    return 0
