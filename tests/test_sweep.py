"""Sweeps on a real local Ray: each distinct trial trains once across tables, results files are complete,
and a second sweep of the same table trains nothing."""
from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.report import build_reports
from pipeline.study.results import row_result
from pipeline.study.rows import table_rows
from pipeline.study.sweep import run_study
from pipeline.study.table_runs import sweep_parents, write_row_runs
from pipeline.training.tracking import client as tracking_client
from pipeline.training.tracking import resolve_uri
from pipeline.training.trial import trial_key

pytestmark = pytest.mark.slow

ROWS_A = {"baseline": {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}},
          "noah": {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}}
ROWS_B = {"sum": {"row": 1, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}},  # = A's noah
          "avg": {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5, "aggregation": "avg"}},
          "avg_again": {"row": 3, "backbone": "resnet18",
                        "head": {"kind": "noah", "N": 4, "r": 0.5, "aggregation": "avg"}}}


def _trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids) if "trial_id" in r.data.tags]


def _first(results: dict) -> list[dict]:
    """Each row's run of its one seed."""
    return [r["runs"][0] for r in results["rows"]]


def test_tables_share_trials_and_rerun_trains_nothing(tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    params = load_params(tiny_params(tables={"ta": {"recipe": "resnet", "rows": ROWS_A},
                                             "tb": {"recipe": "resnet", "rows": ROWS_B}}))
    uri = params.mlflow.tracking_uri
    out = tmp_path / "results"

    first = run_study(params, ["ta"], out)["ta"]
    assert [r["status"] for r in _first(first)] == ["FINISHED", "FINISHED"]
    assert len(_trial_runs(uri)) == 2
    folders = sorted(p for p in Path(params.train.checkpoint_root).iterdir() if p.is_dir())
    assert len(folders) == 2, "one checkpoint folder per trial"
    assert all(not (f / "last.pt").exists() and (f / "result.json").is_file() for f in folders), \
        "no table fine-tunes from these trials: the study keeps their result, not their weights"

    second = run_study(params, ["tb"], out)["tb"]
    runs = _trial_runs(uri)
    assert len(runs) == 3, "tb's first row reuses ta's run; its rows 2 and 3 are one trial"
    assert _first(second)[0]["run_id"] == _first(first)[1]["run_id"]
    assert _first(second)[1]["run_id"] == _first(second)[2]["run_id"]
    assert all(r.info.status == "FINISHED" and r.data.tags.get("ray_node_id") for r in runs)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} <= {
        r.info.run_id for r in MlflowClient(uri).search_runs(
            [e.experiment_id for e in MlflowClient(uri).search_experiments()]) if "sweep" in r.data.tags}

    again = run_study(params, ["ta"], out)["ta"]
    assert len(_trial_runs(uri)) == 3
    assert [r["run_id"] for r in _first(again)] == [r["run_id"] for r in _first(first)]

    saved = json.loads((out / "tb.json").read_text())
    assert saved["meta"]["img_size"] == 32 and saved["meta"]["num_classes"] == 4
    assert [(r["row"], r["name"]) for r in saved["rows"]] == [(1, "sum"), (2, "avg"), (3, "avg_again")]
    assert all(0 <= r["top1"] <= 100 and r["params"] > 0 and r["madds"] > 0 for r in _first(saved))
    csv_lines = (out / "tb.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("row,name,") and csv_lines[3].startswith("3,avg_again,")


def test_two_seeds_give_every_row_n_std_and_a_paired_interval(tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    """`seeds: [0, 1]` trains every row twice (a seed is part of the identity); the report of the real runs has
    n = 2, a sample std and a paired 95% interval on every row, and an arrow exactly where it excludes zero."""
    rows = {"baseline": {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}},
            "spatial": {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}},
            "channel": {"row": 3, "backbone": "resnet18",
                        "head": {"kind": "noah", "N": 4, "r": 0.5, "softmax_axis": "channel"}}}
    params = load_params(tiny_params(seeds=[0, 1], tables={"table6": {"recipe": "resnet", "rows": rows}}))
    out = tmp_path / "results"
    results = run_study(params, ["table6"], out)["table6"]
    runs = [run for row in results["rows"] for run in row["runs"]]
    assert [run["seed"] for run in runs] == [0, 1] * 3 and {run["status"] for run in runs} == {"FINISHED"}
    assert len({run["trial_id"] for run in runs}) == 6 and len(_trial_runs(params.mlflow.tracking_uri)) == 6
    assert results["meta"]["seeds"] == [0, 1] and results["meta"]["chance"]["top1"] == 25.0

    build_reports(out, tmp_path / "reports", params.mlflow.tracking_uri)
    records = list(csv.DictReader(open(tmp_path / "reports" / "table6.csv", newline="")))
    assert [r["n"] for r in records] == ["2", "2", "2"] and all(r["top1_std"] for r in records)
    metrics = json.loads((tmp_path / "reports" / "metrics" / "table6.json").read_text())["table6"]  # what DVC shows
    assert list(metrics) == [r["name"] for r in records] == ["baseline", "spatial", "channel"]
    assert all(m["n"] == 2 and m["top1_std"] == pytest.approx(float(r["top1_std"]), abs=1e-4)
               for m, r in zip(metrics.values(), records))
    curves = list(csv.DictReader(open(tmp_path / "reports" / "plots" / "curves" / "table6.csv", newline="")))
    assert [(c["row"], c["epoch"]) for c in curves] == [(name, "1") for name in metrics]  # one epoch, from MLflow
    for c in curves:  # the mean over the seeds of its last (here also its best) validation top-1
        assert float(c["val_top1"]) == pytest.approx(metrics[c["row"]]["top1"], abs=1e-3)
    table = [line.strip("|").split(" | ") for line in (tmp_path / "reports" / "table6.md").read_text().splitlines()
             if line.startswith("| ")]
    top1 = [row[table[0].index("Top-1 (%)")] for row in table[1:]]
    for record, cell in zip(records[1:], top1[1:]):
        low, high = float(record["top1_delta_low"]), float(record["top1_delta_high"])
        assert low <= float(record["top1_delta"]) <= high and cell.startswith(f"{float(record['top1']):.2f} ±")
        assert ("↑" in cell or "↓" in cell) == (low > 0 or high < 0), cell


def test_each_table_experiment_lists_its_rows_and_reruns_add_none(
        tiny_params: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trial run is tagged with its tables, rows, profile, seed and DVC experiment; `tb`'s experiment has
    a row run for each of its three rows with the row's metrics, its row `sum` linking the run `ta` trained; running
    the study again reuses each table's parent and rewrites the row runs in place."""
    monkeypatch.setenv("DVC_EXP_NAME", "exp-rows")
    params = load_params(tiny_params(tables={"ta": {"recipe": "resnet", "rows": ROWS_A},
                                             "tb": {"recipe": "resnet", "rows": ROWS_B}}))
    uri, out = params.mlflow.tracking_uri, tmp_path / "results"
    client = MlflowClient(uri)
    ta = _first(run_study(params, ["ta"], out)["ta"])
    tb = _first(run_study(params, ["tb"], out)["tb"])
    shared = client.get_run(ta[1]["run_id"])
    assert client.get_experiment(shared.info.experiment_id).name == "ta"
    assert {k: shared.data.tags.get(k) for k in ("tables", "rows", "profile", "seed", "dvc_experiment")} == {
        "tables": "ta, tb", "rows": "ta:noah, tb:sum", "profile": "smoke", "seed": "0", "dvc_experiment": "exp-rows"}
    assert client.get_run(tb[1]["run_id"]).data.tags["rows"] == "tb:avg, tb:avg_again"

    def view(table: str) -> tuple[list, list]:
        exp = client.get_experiment_by_name(table).experiment_id
        parents = client.search_runs([exp], f"tags.sweep = '{table}'")
        order = list({"ta": ROWS_A, "tb": ROWS_B}[table])  # the table's order
        runs = client.search_runs([exp], f"tags.table = '{table}'")
        return parents, sorted(runs, key=lambda r: order.index(r.data.tags["row"]))

    parents, rows = view("tb")
    assert [r.info.run_name for r in rows] == [f"row {name}: resnet18 {h} seed 0" for name, h in (
        ("sum", "noah(N=4,r=0.5)"), ("avg", "noah(N=4,r=0.5,aggregation=avg)"),
        ("avg_again", "noah(N=4,r=0.5,aggregation=avg)"))]
    assert [r.data.tags["trial_run"] for r in rows] == [t["run_id"] for t in tb]
    assert [(r.data.metrics["top1"], r.data.metrics["top5"]) for r in rows] == [(t["top1"], t["top5"]) for t in tb]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               and r.data.tags["dvc_experiment"] == "exp-rows" for r in rows)
    assert f"#/experiments/{shared.info.experiment_id}/runs/{shared.info.run_id}" in rows[0].data.tags[
        "mlflow.note.content"]
    assert "trial_id" not in rows[0].data.tags, "a row run must not pass for a trial run"
    shared_view = json.loads(client.get_experiment_by_name("tb").tags["mlflow.sharedViewState.rows"])
    columns = ("best_top1", "madds", "params", "top1", "top5")  # the results a table compares, not the speeds
    assert shared_view["selectedColumns"] == [f"metrics.`{k}`" for k in columns]
    exp = client.get_experiment_by_name("tb").experiment_id
    assert {r.info.run_id for r in client.search_runs([exp], shared_view["searchFilter"])} == {
        r.info.run_id for r in rows}, "the UI view's search is the table's row runs"

    run_study(params, ["tb"], out)
    run_study(params, ["ta", "tb"], out)
    for table in ("ta", "tb"):
        again, rows_again = view(table)
        assert len(again) == 1 and again[0].info.status == "FINISHED", table
        assert [r.data.tags["row"] for r in rows_again] == list({"ta": ROWS_A, "tb": ROWS_B}[table])
    assert [r.info.run_id for r in view("tb")[1]] == [r.info.run_id for r in rows]
    assert len(client.get_metric_history(rows[0].info.run_id, "top1")) == 1
    assert len(_trial_runs(uri)) == 3


def test_a_row_without_a_run_is_a_failed_row_run_with_the_reason(tiny_params: Callable[..., Path]) -> None:
    """Before any trial ran (or after all failed) each row still has its row run, FAILED with the reason and
    no metrics; the table's parent is found again, not made twice."""
    params = load_params(tiny_params(tables={"ta": {"recipe": "resnet", "rows": ROWS_A}}))
    uri = resolve_uri(params.mlflow.tracking_uri)
    client = tracking_client(uri)
    rows = table_rows(params, "ta")
    results = [row_result(rt, {k: trial_key(t) for k, t in rt.trials.items()}, uri, {}) for rt in rows]
    parent = sweep_parents(client, ["ta"], params.profile)["ta"]
    assert sweep_parents(client, ["ta"], params.profile)["ta"].run_id == parent.run_id
    write_row_runs(client, parent, rows, results, params.profile)
    runs = client.search_runs([parent.experiment_id], "tags.table = 'ta'", order_by=["tags.row"])
    assert [(r.data.tags["row"], r.info.status, r.data.metrics) for r in runs] == [("baseline", "FAILED", {}),
                                                                                   ("noah", "FAILED", {})]
    assert runs[0].data.tags["failure_reason"] == "classify: no run was recorded for this trial"
