"""The pipeline against a real MLflow tracking server on PostgreSQL (`tracking_server`): a study whose trials on
both nodes of a two-node Ray cluster log to it, reused on a second run, its numbers equal to the same study's on
SQLite; a server stopped mid-study and started again loses and duplicates nothing; a server that does not
answer at the start is one error line before Ray starts."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from tracking_server import TrackingServer, free_port

from pipeline import REPO_ROOT
from pipeline.config import load_params
from pipeline.study.sweep import run_study
from pipeline.training.tracking import TRIAL_TAG

pytestmark = pytest.mark.slow

BASELINE = {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}
NOAH = {"row": 1, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}
TABLES = {"tc1": {"recipe": "resnet", "rows": {"baseline": BASELINE}},
          "tc2": {"recipe": "resnet", "rows": {"noah": NOAH}}}
NUMBERS = ("status", "top1", "top5", "params", "trial_id")


def _numbers(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: run.get(k) for k in NUMBERS} for table in sorted(results) for row in results[table]["rows"]
            for run in row["runs"]]


def _trial_runs(client: MlflowClient) -> list[Any]:
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids, max_results=1000) if TRIAL_TAG in r.data.tags]


@pytest.mark.slow
def test_a_two_node_study_logs_to_the_server_reuses_its_runs_and_matches_sqlite(
        ray_cluster: tuple[str, str], tracking_server: TrackingServer, tiny_params: Callable[..., Path],
        tmp_path: Path) -> None:
    cluster, _ = ray_cluster
    on_sqlite = load_params(tiny_params(seeds=[0], tables=TABLES))
    expected = _numbers(run_study(on_sqlite, ["tc1", "tc2"], tmp_path / "sqlite"))
    params = load_params(tiny_params(seeds=[0], tables=TABLES, mlflow={"tracking_uri": tracking_server.uri},
                                     ray={"address": cluster, "cpus_per_trial": 1, "max_concurrent": 2},
                                     train={"checkpoint_root": str(tmp_path / "server_checkpoints")}))
    results = run_study(params, ["tc1", "tc2"], tmp_path / "results")
    assert _numbers(results) == expected, "the same trials, the same numbers, whichever store holds them"
    client = MlflowClient(tracking_server.uri)
    rows = [results[t]["rows"][0]["runs"][0] for t in ("tc1", "tc2")]
    runs = [client.get_run(r["run_id"]) for r in rows]
    assert len({run.data.tags["ray_node_id"] for run in runs}) == 2, "one trial per node: one CPU each"
    for table in ("tc1", "tc2"):
        exp = client.get_experiment_by_name(table).experiment_id
        table_runs = client.search_runs([exp], "tags.`mlflow.parentRunId` != ''")
        parents = {r.data.tags["mlflow.parentRunId"] for r in table_runs}
        assert table_runs and all(client.get_run(p).info.status == "FINISHED" for p in parents), table
    before = {r.info.run_id: r.info.end_time for r in _trial_runs(client)}
    again = run_study(params, ["tc1", "tc2"], tmp_path / "results")
    assert _numbers(again) == expected
    assert {r.info.run_id: r.info.end_time for r in _trial_runs(client)} == before, "nothing retrained"


@pytest.mark.slow
def test_a_server_stopped_mid_study_loses_and_duplicates_nothing(
        tracking_server: TrackingServer, tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    rows = {f"r{i}": {"row": i, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": r}}
            for i, r in enumerate((0.25, 0.5), start=1)}
    tables = {"outage": {"recipe": "resnet", "rows": rows}}
    expected = _numbers(run_study(load_params(tiny_params(seeds=[1], tables=tables)), ["outage"], tmp_path / "a"))
    params = load_params(tiny_params(seeds=[1], tables=tables, mlflow={"tracking_uri": tracking_server.uri},
                                     ray={"max_concurrent": 1},
                                     train={"checkpoint_root": str(tmp_path / "server_checkpoints")}))
    client = MlflowClient(tracking_server.uri)
    outage: list[float] = []

    def stop_when_one_finished() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("outage")
            done = exp and client.search_runs([exp.experiment_id], f"tags.{TRIAL_TAG} != '' and "
                                              "attributes.status = 'FINISHED'")
            if done:
                tracking_server.stop()
                start = time.monotonic()
                time.sleep(25)
                tracking_server.start()
                outage.append(time.monotonic() - start)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_when_one_finished)
    watcher.start()
    try:
        results = run_study(params, ["outage"], tmp_path / "b")
    finally:
        watcher.join()
    assert outage and outage[0] >= 25, "the server was down for 25 s mid-study"
    assert _numbers(results) == expected, "the same results as the study on SQLite, which nothing interrupted"
    runs = _trial_runs(client)
    seeded = [r for r in runs if r.data.tags[TRIAL_TAG] in {n["trial_id"] for n in expected}]
    assert len(seeded) == 2 and all(r.info.status == "FINISHED" for r in seeded), "one run per trial, none lost"
    for run in seeded:
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert [m.step for m in history] == [0], "each epoch logged once"


def test_a_server_that_does_not_answer_is_one_error_before_ray_starts(
        tiny_params: Callable[..., Path]) -> None:
    params = tiny_params(tables=TABLES, mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    started = time.monotonic()
    stage = subprocess.run([sys.executable, "stages/study.py", "--params", str(params), "tc1"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert stage.returncode == 2, stage.stderr
    assert stage.stderr.startswith("error: mlflow.tracking_uri") and "does not answer" in stage.stderr
    assert stage.stderr.count("\n") == 1, "one line, before Ray starts"
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_finished_sqlite_study_migrated_onto_the_server_trains_nothing_again(
        tracking_server: TrackingServer, tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    tables = {"moved": {"recipe": "resnet", "rows": {"baseline": BASELINE}}}
    on_sqlite = load_params(tiny_params(seeds=[2], tables=tables))
    expected = _numbers(run_study(on_sqlite, ["moved"], tmp_path / "sqlite"))
    migrate = [sys.executable, "-m", "pipeline", "migrate-tracking", "--from", on_sqlite.mlflow.tracking_uri,
               "--to", tracking_server.uri]
    for copied in ("runs copied, 0 copied before", ": 0 runs copied"):  # again: nothing new to copy
        done = subprocess.run(migrate, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and copied in done.stderr and ": 0 runs copied, 0" not in done.stderr, done.stderr
    client = MlflowClient(tracking_server.uri)
    moved = [r for r in _trial_runs(client) if r.data.tags[TRIAL_TAG] == expected[0]["trial_id"]]
    assert len(moved) == 1 and moved[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(moved[0].info.run_id, "val_top1")] == [0]
    params = load_params(tiny_params(seeds=[2], tables=tables, mlflow={"tracking_uri": tracking_server.uri}))
    results = run_study(params, ["moved"], tmp_path / "server")
    assert _numbers(results) == expected
    assert results["moved"]["rows"][0]["runs"][0]["run_id"] == moved[0].info.run_id, "reused, not retrained"
    assert len([r for r in _trial_runs(client) if r.data.tags[TRIAL_TAG] == expected[0]["trial_id"]]) == 1


def test_train_with_a_server_that_does_not_answer_is_one_error(tiny_data: Path, tmp_path: Path) -> None:
    train = subprocess.run([sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--data",
                            str(tiny_data), "--epochs", "1", "--img-size", "32", "--tracking-uri",
                            f"http://127.0.0.1:{free_port()}", "--checkpoint-dir", str(tmp_path / "ckpt")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and train.stderr.startswith("error: --tracking-uri"), train.stderr
    assert "does not answer" in train.stderr and train.stderr.count("\n") == 1
    assert not (tmp_path / "ckpt").exists(), "nothing started"
