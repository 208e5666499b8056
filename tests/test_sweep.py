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
from pipeline.study.sweep import run_study

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
