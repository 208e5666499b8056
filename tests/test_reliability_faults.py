"""Faults during a sweep on a real Ray: a trial process SIGKILLed mid-training, a node of a two-node
cluster killed mid-sweep, a loss that turns NaN. Ray Tune retries (`ray.max_failures`), the trainer resumes
from its checkpoint into the same MLflow run, and no finished epoch or trial is lost or logged twice."""
from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.study.rows import table_rows
from pipeline.study.sweep import run_study
from pipeline.training.record import CHECKPOINT, CheckpointError, load_checkpoint
from pipeline.training.trial import trial_key

pytestmark = pytest.mark.slow

EPOCHS = 5
ROW = {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}
ROWS = {"baseline": ROW}  # a table of that one row
TAG = "NOAH_RELIABILITY_TAG"


class Killer(threading.Thread):
    """Watches the trial checkpoints; once one holds `after` epochs, SIGKILLs the processes `pick` finds."""

    def __init__(self, checkpoints: Path, pick: Callable[[], list[psutil.Process]], after: int = 1):
        super().__init__(daemon=True)
        self.checkpoints, self.pick, self.after = checkpoints, pick, after
        self.killed: list[int] = []
        self.epoch: int | None = None
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for path in self.checkpoints.glob(f"*/{CHECKPOINT}"):
                try:
                    epoch = load_checkpoint(path)["epoch"]
                except (OSError, CheckpointError):
                    continue
                victims = self.pick() if epoch >= self.after else []
                if victims:
                    for proc in victims:
                        proc.send_signal(signal.SIGKILL)
                    self.killed, self.epoch, self.at = [p.pid for p in victims], epoch, time.time()
                    return

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def _tagged_trial_workers(tag: str) -> list[psutil.Process]:
    """Ray worker processes running a Tune trial that were started from this test (they inherit TAG)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ImplicitFunc" in " ".join(proc.info["cmdline"] or []) and proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _epoch_steps(client: MlflowClient, run_id: str, key: str = "val_top1") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _tune_reports(storage: Path) -> dict[str, list[int]]:
    """Per Tune trial folder, the epochs its reports carried (over all attempts), in order."""
    out = {}
    for path in storage.glob("*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [int(r["epoch"]) for r in rows if "epoch" in r]
    return out


def test_sigkilled_trial_is_retried_and_resumes_from_its_checkpoint(
        tiny_params: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)  # inherited by the local Ray's workers: only ours get killed
    params = load_params(tiny_params(
        profiles={"smoke": {"epochs": EPOCHS, "batch_size": 8}},
        ray={"max_failures": 2, "max_concurrent": 1},
        tables={"tk": {"recipe": "resnet", "rows": ROWS}}))
    with Killer(Path(params.train.checkpoint_root), lambda: _tagged_trial_workers(tag)) as killer:
        results = run_study(params, ["tk"], tmp_path / "results")["tk"]
    assert killer.killed, "the trial process was killed mid-training"
    assert 1 <= killer.epoch < EPOCHS
    ((row,),) = [r["runs"] for r in results["rows"]]
    assert row["status"] == "FINISHED", row
    client = MlflowClient(params.mlflow.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.trial_id = '{row['trial_id']}'")
    assert [r.info.run_id for r in runs] == [row["run_id"]], "the retry reopened the same run"
    for key in ("train_loss", "val_top1", "lr", "epoch_seconds"):
        assert _epoch_steps(client, row["run_id"], key) == list(range(EPOCHS)), key
    # Resumed, not restarted: epochs after the checkpoint were logged after the kill, earlier ones before,
    # and across both attempts Tune saw every epoch at most once (a restart from scratch repeats epoch 0).
    history = {m.step: m.timestamp / 1000 for m in client.get_metric_history(row["run_id"], "val_top1")}
    assert all(history[e] <= killer.at for e in range(killer.epoch))
    assert all(history[e] >= killer.at - 1 for e in range(killer.epoch, EPOCHS))
    (reported,) = _tune_reports(Path(params.ray.storage_path)).values()
    assert len(reported) == len(set(reported)) and reported == sorted(reported), reported
    assert reported[0] == 0 and reported[-1] == EPOCHS - 1, "the reports of both attempts"
    folder = Path(params.train.checkpoint_root) / row["trial_id"]
    assert (folder / "result.json").is_file() and not (folder / CHECKPOINT).exists(), \
        "finished, and no table fine-tunes from it: the study keeps its result, not its checkpoint"


def test_nan_trial_fails_quickly_with_its_reason_and_the_study_goes_on(
        tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    params = load_params(tiny_params(
        recipes={"boom": {"schedule": "step", "optimizer": "sgd", "lr": 1.0e30, "batch_size": 256, "epochs": 100}},
        ray={"max_failures": 2},
        tables={"tboom": {"recipe": "boom", "rows": ROWS}, "tok": {"recipe": "resnet", "rows": ROWS}}))
    boom, ok = (trial_key(table_rows(params, t)[0].trials["classify", 0]) for t in ("tboom", "tok"))
    client = MlflowClient(params.mlflow.tracking_uri)
    start = time.monotonic()
    results = run_study(params, ["tboom", "tok"], tmp_path / "results")  # one Ray Tune run holding both trials
    assert time.monotonic() - start < 240
    ids = [e.experiment_id for e in client.search_experiments()]

    def runs(key: str) -> list:
        return client.search_runs(ids, filter_string=f"tags.trial_id = '{key}'")

    (failed,), (finished,) = runs(boom), runs(ok)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"].startswith("NonFiniteLossError: training loss became")
    assert not _epoch_steps(client, failed.info.run_id), "it failed within its first epoch"
    assert finished.info.status == "FINISHED" and _epoch_steps(client, finished.info.run_id) == [0]
    assert not list(Path(params.ray.storage_path).glob("study-*/*/error.txt")), "a diverged trial is not retried"
    saved = json.loads((tmp_path / "results" / "tboom.json").read_text())  # the results file carries the reason
    assert saved["rows"] == results["tboom"]["rows"]
    ((row,),) = [r["runs"] for r in saved["rows"]]
    assert row["status"] == "FAILED" and row["reason"].startswith("NonFiniteLossError")
    assert "top1" not in row or row["top1"] is None
    assert results["tok"]["rows"][0]["runs"][0]["status"] == "FINISHED"


# ---- a two-node cluster losing a node


def _second_node(temp: str) -> list[psutil.Process]:
    """The second node's raylet and everything it started, once it runs a trial."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "raylet" in cmd and temp in cmd and "second_node" in cmd:
            tree = [proc, *proc.children(recursive=True)]
            if any("ImplicitFunc" in " ".join(p.cmdline()) for p in tree[1:] if p.is_running()):
                return tree
    return []


def test_trials_of_a_killed_node_finish_on_the_other(ray_cluster: tuple[str, str], tiny_params: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    address, temp = ray_cluster
    params = load_params(tiny_params(
        profiles={"smoke": {"epochs": 3, "batch_size": 8}},
        ray={"address": address, "cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 2},
        tables={"tn": {"recipe": "resnet", "rows": {
            "baseline": ROW, "noah": {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}}}}))
    with Killer(Path(params.train.checkpoint_root), lambda: _second_node(temp)) as killer:
        results = run_study(params, ["tn"], tmp_path / "results")["tn"]
    assert killer.killed, "the second node was killed while it trained a trial"
    rows = [r["runs"][0] for r in results["rows"]]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED"]
    client = MlflowClient(params.mlflow.tracking_uri)
    nodes = {client.get_run(r["run_id"]).data.tags["ray_node_id"] for r in rows}
    assert len(nodes) == 1, "both trials ended on the surviving head node"
    for r in rows:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.trial_id = '{r['trial_id']}'")
        assert len(runs) == 1
        assert _epoch_steps(client, r["run_id"]) == [0, 1, 2]
