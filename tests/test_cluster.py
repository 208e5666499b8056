"""A study against a real two-node Ray cluster started here (`ray start --head` plus a second node with
`ray start --address`, both on 127.0.0.1, each with one CPU and a resource of its own): one study run
places trials of different tables side by side, one on each node. The cluster is stopped afterwards, by
its own temp folder, leaving any other Ray alone."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.study.sweep import run_study

pytestmark = pytest.mark.slow

BASELINE = {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}
NOAH = {"row": 1, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}


def test_one_study_runs_trials_of_two_tables_side_by_side_on_both_nodes(
        ray_cluster: tuple[str, str], tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    cluster, _ = ray_cluster
    params = load_params(tiny_params(
        profiles={"smoke": {"epochs": 2, "batch_size": 16}},
        ray={"address": cluster, "cpus_per_trial": 1, "max_concurrent": 2},
        tables={"tc1": {"recipe": "resnet", "rows": {"baseline": BASELINE}},
                "tc2": {"recipe": "resnet", "rows": {"noah": NOAH}}}))
    results = run_study(params, ["tc1", "tc2"], tmp_path / "results")
    rows = [results[t]["rows"][0]["runs"][0] for t in ("tc1", "tc2")]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED"]
    client = MlflowClient(params.mlflow.tracking_uri)
    runs = [client.get_run(r["run_id"]) for r in rows]
    assert len({run.data.tags["ray_node_id"] for run in runs}) == 2, "one trial per node: one CPU each"
    (a, b) = [(run.info.start_time, run.info.end_time) for run in runs]
    assert a[0] < b[1] and b[0] < a[1], "the two tables' trials trained at the same time"
