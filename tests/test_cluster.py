"""A sweep against a real two-node Ray cluster started here (`ray start --head` plus a second node with
`ray start --address`, both on 127.0.0.1, each with one CPU and a resource of its own): trials run on
both nodes. The cluster is stopped afterwards, by its own temp folder, leaving any other Ray alone."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.study.sweep import run_table

ROWS = [{"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}},
        {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}]


def test_sweep_runs_trials_on_both_nodes(ray_cluster: tuple[str, str], tiny_params: Callable[..., Path],
                                         tmp_path: Path) -> None:
    cluster, _ = ray_cluster
    params = load_params(tiny_params(ray={"address": cluster, "cpus_per_trial": 1, "max_concurrent": 2},
                                     tables={"tc": {"recipe": "resnet", "rows": ROWS}}))
    results = run_table(params, "tc", tmp_path / "results")
    assert [r["status"] for r in results["rows"]] == ["FINISHED", "FINISHED"]
    client = MlflowClient(params.mlflow.tracking_uri)
    nodes = {client.get_run(r["run_id"]).data.tags["ray_node_id"] for r in results["rows"]}
    assert len(nodes) == 2, "with one CPU per node and per trial, the two trials run on different nodes"
