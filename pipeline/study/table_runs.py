"""Each table's view in MLflow: a parent run per table, and under it one row run per row and seed.

A trial is trained once, in the experiment of the first table that needs it, so a table's experiment alone
would miss the rows it shares with other tables. Its parent run (`<table> (<profile>)`, one per table,
profile and DVC experiment) is found again on every re-run; under it each row and seed has a row run
(`row 3: resnet18 noah(N=4,r=0.5) seed 0`) with the row's final metrics, tagged `table`, `row`, `seed` and
`profile`, linking the trial runs it reads from (`trial_run`, or `scratch_trial_run`/`finetune_trial_run`,
and a note with links), wherever they were trained. Row runs are rewritten in place when results are
written, so a re-run adds none. Trial runs in turn carry the tables and rows (`table:row`) that use them.
The experiment also holds a view of the MLflow UI (`ROWS_VIEW`) that lists the row runs with their metrics.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunInfo, RunTag

from ..training.tracking import (
    DVC_EXP_TAG,
    FINAL_METRICS,
    PROFILE_TAG,
    REASON_TAG,
    ROWS_TAG,
    SEED_TAG,
    TABLES_TAG,
    TAG_SEPARATOR,
    dvc_experiment,
    experiment_id,
    git_commit,
    latest_run,
)
from .results import kind_prefix
from .rows import RowTrials, StudyTrial, table_order

SWEEP_TAG = "sweep"  # on a table's parent run: the table
TABLE_TAG, ROW_TAG = "table", "row"  # on a row run: its table and row (trial runs carry `tables` and `rows`)
TRIAL_RUN_TAG = "trial_run"  # on a row run: the id of its trial's run, `<kind>_trial_run` for a reid row's two
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
PARENT_TAG = "mlflow.parentRunId"
ROWS_VIEW = "rows"
"""The MLflow UI view each table's experiment opens with `…/#/experiments/<id>/runs?viewStateShareKey=rows`:
its row runs, by row, with their metrics as columns (the UI's shared views live in experiment tags)."""
SHARED_VIEW_TAG = "mlflow.sharedViewState."
SPEEDS = ("images_per_s", "train_seconds")  # on a row run, but not columns of its view: how fast, not how good


def _study_tags(profile: str) -> dict[str, str]:
    exp = dvc_experiment()
    return {PROFILE_TAG: profile, **({DVC_EXP_TAG: exp} if exp else {})}


def trial_tags(st: StudyTrial, profile: str) -> dict[str, str]:
    """The tags a study starts a trial run with: its tables, rows, profile, seed and DVC experiment."""
    return {TABLES_TAG: TAG_SEPARATOR.join(st.tables), ROWS_TAG: TAG_SEPARATOR.join(st.rows),
            SEED_TAG: str(st.trial.seed), **_study_tags(profile)}


def _joined(held: str | None, new: Iterable[str]) -> str:
    """A separated tag value with `new` added to what it `held`, in the paper's table order."""
    items = dict.fromkeys([*(held.split(TAG_SEPARATOR) if held else []), *new])
    return TAG_SEPARATOR.join(sorted(items, key=lambda item: table_order(item.split(":")[0])))


def tag_trial_runs(mlflow_client: MlflowClient, trials: dict[str, StudyTrial], profile: str, uri: str) -> None:
    """Add this study's tables and rows to every trial run it used, reused ones included (a run trained for
    Table 5 learns that Table 7 reads it too); profile and seed where a run lacks them."""
    for st in trials.values():
        run = latest_run(st.key, uri)
        if run is None:
            continue
        held = run.data.tags
        tags = {TABLES_TAG: _joined(held.get(TABLES_TAG), st.tables), ROWS_TAG: _joined(held.get(ROWS_TAG), st.rows),
                PROFILE_TAG: held.get(PROFILE_TAG, profile), SEED_TAG: str(st.trial.seed)}
        changed = [RunTag(k, v) for k, v in tags.items() if held.get(k) != v]
        if changed:
            mlflow_client.log_batch(run.info.run_id, tags=changed)


def sweep_parents(mlflow_client: MlflowClient, tables: list[str], profile: str) -> dict[str, RunInfo]:
    """Each table's parent run for this profile and DVC experiment, reopened (RUNNING) if a study made it
    before, else created."""
    study = _study_tags(profile)
    parents = {}
    for table in tables:
        exp_id = experiment_id(mlflow_client, table)
        found = [r for r in mlflow_client.search_runs([exp_id], f"tags.{SWEEP_TAG} = '{table}'",
                                                      order_by=["attributes.start_time ASC"])
                 if all(r.data.tags.get(k) == study.get(k) for k in (PROFILE_TAG, DVC_EXP_TAG))]
        tags = {SWEEP_TAG: table, "git_commit": git_commit(), **study}
        if found:
            run_id = found[0].info.run_id
            mlflow_client.update_run(run_id, status="RUNNING")
            if REASON_TAG in found[0].data.tags:  # why it ended last time
                mlflow_client.delete_tag(run_id, REASON_TAG)
            mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            parents[table] = mlflow_client.get_run(run_id).info
        else:
            exp = study.get(DVC_EXP_TAG)
            name = f"{table} ({profile}{f', DVC experiment {exp}' if exp else ''})"
            parents[table] = mlflow_client.create_run(exp_id, tags=tags, run_name=name).info
    return parents


def close_parent(mlflow_client: MlflowClient, parent: RunInfo, status: str, reason: str | None = None) -> None:
    """End a table's parent run with `status` and `reason` (why it did not finish), and as KILLED, with that
    reason, every trial run of it still RUNNING: its process was ended with the sweep (a re-run reopens the
    run and resumes the trial)."""
    left = mlflow_client.search_runs([parent.experiment_id], filter_string=(
        f"tags.{PARENT_TAG} = '{parent.run_id}' and attributes.status = 'RUNNING'"))
    for run in left:
        mlflow_client.set_tag(run.info.run_id, REASON_TAG, reason or f"interrupted: the sweep ended {status}")
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
    if reason:
        mlflow_client.set_tag(parent.run_id, REASON_TAG, reason)
    mlflow_client.set_terminated(parent.run_id, status)


def write_row_runs(mlflow_client: MlflowClient, parent: RunInfo, rows: list[RowTrials], results: list[dict[str, Any]],
                   profile: str) -> None:
    """Create or rewrite the row run of every row and seed of a table under its `parent` from the table's
    results rows (`results.row_result`); row runs of rows or seeds the table no longer has are deleted."""
    held = {(r.data.tags[ROW_TAG], r.data.tags[SEED_TAG]): r for r in mlflow_client.search_runs(
        [parent.experiment_id], f"tags.{PARENT_TAG} = '{parent.run_id}' and tags.{TABLE_TAG} = '{rows[0].table}'")}
    study, metrics = _study_tags(profile), set()
    for rt, result in zip(rows, results):
        for outcome in result["runs"]:
            name, seed = rt.row.name, str(outcome["seed"])
            kinds = [kind for kind, s in rt.trials if s == outcome["seed"]]
            metrics |= _write_row_run(mlflow_client, parent, held.pop((name, seed), None), rt, outcome, kinds,
                                      {TABLE_TAG: rt.table, ROW_TAG: name, SEED_TAG: seed, **study})
    for stale in held.values():
        mlflow_client.delete_run(stale.info.run_id)
    where = " and ".join(f"tags.{k} = '{v}'" for k, v in {TABLE_TAG: rows[0].table, **study}.items())
    view = {"searchFilter": where, "orderByKey": f"tags.`{ROW_TAG}`", "orderByAsc": True,
            "selectedColumns": [f"metrics.`{k}`" for k in sorted(metrics) if not k.endswith(SPEEDS)]}
    mlflow_client.set_experiment_tag(parent.experiment_id, SHARED_VIEW_TAG + ROWS_VIEW, json.dumps(view))


def _write_row_run(mlflow_client: MlflowClient, parent: RunInfo, held: Run | None, rt: RowTrials,
                   outcome: dict[str, Any], kinds: list[str], tags: dict[str, str]) -> set[str]:
    """One row run: the row's final metrics, the ids of its trials' runs and a note linking them; FINISHED
    when all its trials finished, else FAILED with their reasons. Rewritten in place, unless it held a metric
    the row no longer has (its trial failed after an edit): then it is replaced. Returns its metrics' names."""
    metrics, links, reasons = {}, [], []
    for kind in kinds:
        prefix = kind_prefix(kind)
        metrics |= {prefix + k: float(v) for k in FINAL_METRICS if (v := outcome.get(prefix + k)) is not None}
        if outcome.get(prefix + "status") != "FINISHED":
            reasons.append(f"{kind}: {outcome.get(prefix + 'reason') or outcome.get(prefix + 'status')}")
        if (run_id := outcome.get(prefix + "run_id")) is not None:
            tags[prefix + TRIAL_RUN_TAG] = run_id
            links.append(_link(mlflow_client, kind, run_id))
    tags[NOTE_TAG] = (f"Row {tags[ROW_TAG]} of {rt.table}, seed {tags[SEED_TAG]}: its metrics are those of "
                      + ("; ".join(links) or "no trial run yet") + ".")
    tags |= {REASON_TAG: "; ".join(reasons)} if reasons else {}
    head = rt.row.head.name
    name = f"row {tags[ROW_TAG]}: {rt.row.backbone} {head} seed {tags[SEED_TAG]}"
    if held is not None and not held.data.metrics.keys() <= metrics.keys():  # MLflow keeps a metric once logged
        mlflow_client.delete_run(held.info.run_id)
        held = None
    if held is None:
        run_id = mlflow_client.create_run(parent.experiment_id, run_name=name,
                                          tags={PARENT_TAG: parent.run_id, **tags}).info.run_id
        held_metrics, held_tags = {}, {}
    else:
        run_id, held_metrics, held_tags = held.info.run_id, held.data.metrics, held.data.tags
        mlflow_client.update_run(run_id, name=name)
        if REASON_TAG in held_tags and not reasons:
            mlflow_client.delete_tag(run_id, REASON_TAG)
    now = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items() if held_tags.get(k) != v],
                            metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if held_metrics.get(k) != v])
    status = "FAILED" if reasons else "FINISHED"
    if held is None or held.info.status != status:  # a rewrite that changes nothing keeps the run's end time
        mlflow_client.set_terminated(run_id, status)
    return set(metrics)


def _link(mlflow_client: MlflowClient, kind: str, run_id: str) -> str:
    """A markdown link to a trial run in the MLflow UI, with the experiment it was trained in."""
    info = mlflow_client.get_run(run_id).info
    table = mlflow_client.get_experiment(info.experiment_id).name
    label = "the trial run" if kind == "classify" else f"the {kind} trial run"
    return f"{label} [{info.run_name}](#/experiments/{info.experiment_id}/runs/{run_id}) (trained in {table})"
