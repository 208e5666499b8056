"""A sweep against a real two-node Ray cluster started here (`ray start --head` plus a second node with
`ray start --address`, both on 127.0.0.1, each with one CPU and a resource of its own): trials run on
both nodes. The cluster is stopped afterwards, by its own temp folder, leaving any other Ray alone."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
from mlflow import MlflowClient

from pipeline.study import load_params
from pipeline.sweep import run_table

ROWS = [{"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}},
        {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run(["ray", "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Two Ray nodes on 127.0.0.1 with token auth; yields the head's address."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    address = f"127.0.0.1:{_free_port()}"
    try:
        _ray("--head", f"--port={address.split(':')[1]}", f"--temp-dir={temp}", "--include-dashboard=false",
             '--resources={"head_node": 1}', env=env)
        _ray(f"--address={address}", '--resources={"second_node": 1}', env=env)
        yield address
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)


def test_sweep_runs_trials_on_both_nodes(cluster: str, tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    params = load_params(tiny_params(ray={"address": cluster, "cpus_per_trial": 1, "max_concurrent": 2},
                                     tables={"tc": {"recipe": "resnet", "rows": ROWS}}))
    results = run_table(params, "tc", tmp_path / "results")
    assert [r["status"] for r in results["rows"]] == ["FINISHED", "FINISHED"]
    client = MlflowClient(params.mlflow.tracking_uri)
    nodes = {client.get_run(r["run_id"]).data.tags["ray_node_id"] for r in results["rows"]}
    assert len(nodes) == 2, "with one CPU per node and per trial, the two trials run on different nodes"
